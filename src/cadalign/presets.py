"""Named sets of parameters (presets) in ``conf/``, composed into ``params.yaml`` by Hydra.

DVC composes ``params.yaml`` from ``conf/`` on ``dvc exp run -S ...`` (``hydra.enabled`` in
``.dvc/config``): ``conf/config.yaml`` holds Hydra's defaults list (``preset: cpu``), each
``conf/preset/<name>.yaml`` one preset, which may start from another through its own
defaults list (gpu from full, full from cpu). One word selects a preset::

    dvc exp run -S preset=gpu                         # compose, then run the study
    dvc exp run -S preset=gpu -S train.optim.steps=100

The committed ``params.yaml`` is the default preset with its comments: Hydra's YAML drops
comments, so the file is the default preset's text (``write``), and ``check`` verifies that
it equals Hydra's composition and that every preset loads through the stages' dataclasses.
``dvc repro`` reads ``params.yaml`` as it is.

Command line::

    python -m cadalign.presets list            # the presets
    python -m cadalign.presets show gpu        # the composed parameters of a preset
    python -m cadalign.presets write           # params.yaml from the default preset
    python -m cadalign.presets check           # params.yaml matches; every preset loads
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cadalign.atomic import write_text
from cadalign.config import ConfigError, load_cities, load_section, read_params

logger = logging.getLogger(__name__)

GROUP = "preset"
PACKAGE_LINE = "# @package _global_"
GENERATED = (
    "# Written by `python -m cadalign.presets write` from conf/preset/{name}.yaml (edit that file, then\n"
    "# rerun it); `dvc exp run -S preset=<name>` composes this file from conf/ (docs/gpu.md).\n"
)


def preset_names(conf_dir: Path) -> list[str]:
    """The presets of ``conf_dir`` (the files of ``conf/preset``), sorted."""
    return sorted(p.stem for p in (Path(conf_dir) / GROUP).glob("*.yaml"))


def default_preset(conf_dir: Path) -> str:
    """The preset ``conf/config.yaml``'s defaults list selects.

    Raises:
        ConfigError: if the file or its ``preset`` entry is missing.
    """
    path = Path(conf_dir) / "config.yaml"
    defaults = read_params(path).get("defaults") or []
    for entry in defaults:
        if isinstance(entry, dict) and GROUP in entry:
            return str(entry[GROUP])
    raise ConfigError(f"{path}: the defaults list names no preset; add '- {GROUP}: cpu' to it")


def compose(conf_dir: Path, preset: str | None = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parameters of ``preset`` (None: the default) as DVC composes them for params.yaml.

    Args:
        conf_dir: the ``conf`` folder.
        preset: a preset name.
        overrides: more Hydra overrides, as ``dvc exp run -S`` takes them.

    Raises:
        ConfigError: for a preset that does not exist (naming those that do).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir).resolve()
    names = preset_names(conf_dir)
    if preset is not None and preset not in names:
        raise ConfigError(f"no preset {preset!r} in {conf_dir / GROUP}; the presets are {', '.join(names)}")
    chosen = [] if preset is None else [f"{GROUP}={preset}"]
    # the calls of dvc.utils.hydra.compose_and_dump, so the result is what `dvc exp run` writes
    with initialize_config_dir(str(conf_dir), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=[*chosen, *overrides])
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)


def params_text(conf_dir: Path) -> str:
    """The text of params.yaml: the default preset's file, comments kept, under a header.

    Raises:
        ConfigError: if the default preset starts from another (then its text is not the
            composition) or lacks the ``_global_`` package line.
    """
    name = default_preset(conf_dir)
    path = Path(conf_dir) / GROUP / f"{name}.yaml"
    text = path.read_text()
    if "defaults" in (yaml.safe_load(text) or {}):
        raise ConfigError(f"{path}: the default preset must not have a defaults list (its text is params.yaml)")
    first, _, body = text.partition("\n")
    if first.strip() != PACKAGE_LINE:
        raise ConfigError(f"{path}: the first line must be '{PACKAGE_LINE}' (the sections are top-level keys)")
    return GENERATED.format(name=name) + body


def load_all(params: Path) -> None:
    """Load every section a stage reads through the stages' own dataclasses and checks.

    Raises:
        ConfigError or ValueError: naming the params key, as the stage itself would.
    """
    # the stage modules pull in torch and the geo stack: imported only when checking
    from cadalign.evaluate import BootstrapConfig
    from cadalign.model import AlignNet
    from cadalign.stages.analyze import SimilarityConfig
    from cadalign.stages.draw import DrawConfig
    from cadalign.stages.fetch import DownloadConfig, InriaSourceConfig, SyntheticConfig
    from cadalign.stages.initialize import initial_factors
    from cadalign.stages.misalign import NoiseConfig
    from cadalign.settings.realign import RealignStageConfig
    from cadalign.settings.train import TrainStageConfig, check_round_names, patch_config
    from cadalign.sources.files import FilesConfig

    sections = {
        "synthetic": SyntheticConfig,
        "inria": InriaSourceConfig,
        "download": DownloadConfig,
        "files": FilesConfig,
        "noise": NoiseConfig,
        "train": TrainStageConfig,
        "realign": RealignStageConfig,
        "similarity": SimilarityConfig,
        "evaluate": BootstrapConfig,
        "draw": DrawConfig,
    }
    data = read_params(params)
    unknown = sorted(set(data) - {*sections, "cities", "rounds"})
    if unknown:
        known = sorted({*sections, "cities", "rounds"})
        raise ConfigError(f"{params}: unknown section '{unknown[0]}'; the sections are {known}")
    loaded = {name: load_section(params, name, cls) for name, cls in sections.items()}
    cities = load_cities(params)
    train = loaded["train"]
    check_round_names(params, train)
    initial_factors(params, train)
    for ds in {*train.factors, *(f for fs in train.round_factors.values() for f in fs)}:
        patch_config(train, ds, 0)  # raises for an input size the model does not take
    net = AlignNet(train.model)
    out = loaded["realign"].window.output_size
    if net.output_size(net.input_size(out)) != out:
        raise ConfigError(f"{params}: realign.window.output_size = {out} is not an output size of train.model")
    ds = loaded["similarity"].ds
    if ds is not None and ds not in train.shared_factors:
        shared = list(train.shared_factors)
        raise ConfigError(f"{params}: similarity.ds = {ds} is not trained in every round ({shared})")
    draw = loaded["draw"]
    tiles = {f"{name}{n}": city for name, city in cities.items() for n in city.tiles}
    if draw.tile not in tiles:
        raise ConfigError(f"{params}: draw.tile = {draw.tile!r} is none of the tiles {sorted(tiles)}")
    x0, y0, width, height = draw.window
    size = loaded["synthetic"].size
    if tiles[draw.tile].source == "synthetic" and max(x0 + width, y0 + height) > size:
        raise ConfigError(
            f"{params}: draw.window {list(draw.window)} reaches beyond the {size} px tile (synthetic.size)"
        )


def check(conf_dir: Path, params: Path, presets: list[str] | None = None) -> list[str]:
    """Check that ``params`` is the default preset and that every preset loads.

    Returns:
        The presets checked.

    Raises:
        ConfigError: naming the first key where params.yaml and the composition differ, or
            the preset and key that does not load.
    """
    names = presets or preset_names(conf_dir)
    expected = compose(conf_dir)
    actual = read_params(params)
    if actual != expected:
        key = _first_difference(actual, expected)
        raise ConfigError(
            f"{params} differs from conf/ at '{key}'; put the change in "
            f"conf/preset/{default_preset(conf_dir)}.yaml and run `python -m cadalign.presets write`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(compose(conf_dir, name), sort_keys=False))
            try:
                load_all(path)
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"preset {name} (conf/{GROUP}/{name}.yaml): {err}") from err
    return names


def _first_difference(a: Any, b: Any, key: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            if a.get(k, ...) != b.get(k, ...):
                return _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
    return key


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="The presets of conf/ and params.yaml.")
    parser.add_argument("command", choices=["list", "show", "write", "check"])
    parser.add_argument("presets", nargs="*", help="show: one preset; check: those to load (default all)")
    parser.add_argument("--conf", type=Path, default=Path("conf"), help="the Hydra config folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "list":
            print("\n".join(preset_names(args.conf)))
        elif args.command == "show":
            if len(args.presets) != 1:
                parser.error("show takes one preset name")
            print(yaml.safe_dump(compose(args.conf, args.presets[0]), sort_keys=False), end="")
        elif args.command == "write":
            write_text(args.params, params_text(args.conf))
            logger.info("wrote %s from preset %s", args.params, default_preset(args.conf))
        else:
            names = check(args.conf, args.params, args.presets)
            print(f"{args.params} is preset {default_preset(args.conf)}; presets {', '.join(names)} load")
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
