"""Which study an output belongs to: a small ``manifest.json`` next to each per-round output.

A stage that writes a per-round output (a label set, a round's networks, an evaluation, a
similarity analysis) also writes ``manifest.json`` into the output's folder: the params.yaml
keys that produced it, with their values. They are its own stage's keys, exactly as dvc.yaml
lists them (:data:`STAGE_PARAMS`; tests/test_provenance.py compares), the keys of the fetch
stages of the cities it read, and every key recorded in its inputs' manifests. A stage that
reads such an output first compares each recorded key with params.yaml as it is now.

After ``dvc repro`` every recorded key has its current value: DVC reruns a stage when one of
its params changes, and every stage downstream of it. A difference therefore means the
output was made by another study and nothing rewrote it, e.g. ``noise.seed`` changed and the
round that wrote the labels was removed from ``rounds`` while a later round still trains on
them, or a stage run by hand. The reading stage stops, naming the manifest, the keys that
differ and the fix. Inputs without a manifest (labels of one's own, outputs of an older
version) are not checked. The manifest is a separate file: the bytes of the other outputs do
not change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cadalign.atomic import write_json
from cadalign.config import read_params

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "fetch": ("cities.{city}", "{source}"),
    "misalign": ("cities.{city}", "noise"),
    "initialize": (
        "train.factors", "train.model", "train.optim", "train.grow", "train.round_factors", "rounds",
    ),
    "train": ("cities", "train", "realign.window", "rounds"),
    "realign": ("cities", "realign"),
    "evaluate": ("cities", "evaluate"),
    "analyze": ("cities", "similarity", "train.factors", "train.round_factors", "train.patches"),
}
"""The params of each stage that writes a manifest, as in dvc.yaml (``{city}`` is ``${key}``,
``{source}`` is ``${item.source}`` of a per-city stage). A key DVC does not track must not be
recorded: a change of it would be refused while ``dvc repro`` reruns nothing."""

ROUND_STAGES = ("train", "realign", "analyze")
"""Stages that write one output per round of ``rounds`` (named by the round)."""


class StaleInputError(ValueError):
    """An input was made with other parameters than params.yaml holds now (another study)."""


def _lookup(params: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key of params.yaml."""
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (lists for tuples, str keys), for comparison with a manifest."""
    return json.loads(json.dumps(value))


def stage_keys(stage: str, params: Mapping[str, Any], city: str | None = None) -> list[str]:
    """The params.yaml keys of ``stage`` (of ``city``, for a per-city stage)."""
    keys = []
    for key in STAGE_PARAMS[stage]:
        if "{city}" in key:
            key = key.format(city=city)
        elif key == "{source}":
            present, source = _lookup(params, f"cities.{city}.source")
            if not present or not isinstance(source, str):
                continue
            key = source
        keys.append(key)
    return keys


def city_keys(params: Mapping[str, Any], cities: Iterable[str]) -> list[str]:
    """The keys of the fetch stages of ``cities`` (their ``data/cities/<city>`` folders)."""
    return [key for city in cities for key in stage_keys("fetch", params, city)]


def read_manifests(folder: Path, cities: Sequence[str] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The manifests of an output folder: its own, else one per city sub-folder (the input
    labels are written per city), as (path, content). Empty when it has none."""
    folder = Path(folder)
    paths = [folder / MANIFEST] if (folder / MANIFEST).is_file() else [folder / c / MANIFEST for c in cities]
    out = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise StaleInputError(f"{path}: unreadable manifest ({err}); rerun the stage that writes {folder} (dvc repro)") from err
        if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
            raise StaleInputError(f"{path}: not a manifest of cadalign; rerun the stage that writes {folder} (dvc repro)")
        out.append((path, data))
    return out


def _differences(recorded: Any, current: Any, key: str, present: bool) -> list[str]:
    """The dotted leaf keys where ``recorded`` and ``current`` differ, each with both values."""
    if not present:
        return [f"{key} was {json.dumps(recorded)}, is absent"]
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for name in sorted(set(recorded) | set(current)):
            if name not in current:
                out.append(f"{key}.{name} was {json.dumps(recorded[name])}, is absent")
            elif name not in recorded:
                out.append(f"{key}.{name} is new ({json.dumps(current[name])})")
            else:
                out += _differences(recorded[name], current[name], f"{key}.{name}", True)
        return out
    return [] if recorded == current else [f"{key} was {json.dumps(recorded)}, is {json.dumps(current)}"]


def check_input(params_path: str | Path, folder: Path, what: str, cities: Sequence[str] = ()) -> dict[str, Any]:
    """Refuse an input made by another study; return the params its manifests record.

    Args:
        params_path: params.yaml.
        folder: the input's folder (holding ``manifest.json``, or ``<city>/manifest.json``).
        what: what the input is, for the message (e.g. ``"labels"``).
        cities: the study's cities, for inputs written per city.

    Raises:
        StaleInputError: naming the manifest, the keys whose value changed and the fix.
    """
    manifests = read_manifests(folder, cities)
    if not manifests:
        logger.debug("%s has no %s: not checked against %s", folder, MANIFEST, params_path)
        return {}
    params = read_params(params_path)
    recorded: dict[str, Any] = {}
    for path, manifest in manifests:
        diffs = []
        for key, value in sorted(manifest["params"].items()):
            present, current = _lookup(params, key)
            diffs += _differences(value, _plain(current), key, present)
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise StaleInputError(
                f"{path}: the {what} in {folder} belong to another study: they were made with other values "
                f"than {params_path} holds now ({shown}). {_fix(params, manifest, folder)}"
            )
        recorded.update(manifest["params"])
    return recorded


def _fix(params: Mapping[str, Any], manifest: Mapping[str, Any], folder: Path) -> str:
    """How to get an input of this study in place of a stale one."""
    stage, name = manifest.get("stage"), manifest.get("name")
    rounds = params.get("rounds")
    if stage in ROUND_STAGES and isinstance(rounds, Mapping) and name not in rounds:
        return (
            f"{name} is no longer a round of `rounds` in params.yaml, so no stage rewrites {folder}: add "
            f"{name} back to `rounds`, or let the rounds that read it train on a label set this study writes; "
            "then run `dvc repro`"
        )
    return f"Run `dvc repro` to remake it (or the stage that writes {folder})"


def write_manifest(
    folder: Path,
    params_path: str | Path,
    stage: str,
    name: str,
    inputs: Iterable[Mapping[str, Any]] = (),
    city: str | None = None,
    cities: Sequence[str] = (),
) -> None:
    """Write ``folder/manifest.json``: the keys of ``stage`` (of ``city``), of the fetch stages
    of ``cities`` and those recorded by the inputs (:func:`check_input`'s results), with their
    values in params.yaml now.

    Args:
        folder: the output folder (the temporary one of an atomic folder write).
        name: what the output is called in the study (a round, a label set, a city).
    """
    params = read_params(params_path)
    keys = set(stage_keys(stage, params, city)) | set(city_keys(params, cities))
    if city is not None and stage != "fetch":
        keys |= set(stage_keys("fetch", params, city))
    for recorded in inputs:
        keys |= set(recorded)
    values = {}
    for key in sorted(keys):
        present, value = _lookup(params, key)
        if present and not any(key.startswith(f"{other}.") for other in keys):  # a section covers its keys
            values[key] = _plain(value)
    write_json(Path(folder) / MANIFEST, {"stage": stage, "name": name, "params": values})
