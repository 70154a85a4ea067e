"""Realignment speed and accuracy: the reference's small windows against large windows.

Per tile, in one process:

- one pass of the ds-1 network over the full-resolution tile (the realign section's
  symmetries), old and new settings interleaved (old, new, old, new ...), and the
  difference of the two fields at the label vertices (GroupNorm makes the field depend on
  the window);
- the whole chain of a round (every ``ds<f>.pt`` of the models folder, coarse to fine, then
  ``realign.refine`` passes, ``smooth_px`` and ``symmetries`` from params.yaml), old then
  new: its seconds and the median vertex error of the realigned labels against the truth
  (``cadalign.evaluate``);
- with ``--compile``: the first compiled pass of the new settings (compilation included)
  and the next ones, against eager.

"old" is the reference layout (64 px windows, overlap 0.5, Hann, 16 per batch, each
symmetry apart); "new" is ``lattice: fit`` with ``--output-size`` (default auto: the largest
window within ``--memory-mb``), ``--overlap`` and Tukey blending, symmetries batched.

Inputs: a study's tiles, noisy labels (round 0) and truth under ``--study`` with the
networks of ``--models``; with ``--tiny``, or when the study has no networks, a synthetic
tile (``cadalign.sources.synthetic``) misaligned by ``cadalign.noise``, and seeded untrained
networks (tiny ones with ``--tiny``, seconds; else params.yaml's ``train.model``, timings
only: the accuracy of untrained networks means nothing).

Usage::

    python bench/bench_realign.py --study data --models data/models/round1 --tiles synthville1
    python bench/bench_realign.py --tiny --json out.json      # CI: seconds
    python bench/bench_realign.py --device cuda --json out.json   # GPU, synthetic tile

The results are printed as a table (the script's output, not a log).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch

from cadalign import evaluate, noise
from cadalign.align import AlignConfig, auto_output_size, predict_field, realign
from cadalign.config import load_cities, load_section
from cadalign.geo.labels import load_labelled_tiles
from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.model import AlignNet, ModelConfig
from cadalign.sources.synthetic import generate_tile
from cadalign.settings.realign import RealignStageConfig
from cadalign.stages.realign import load_models
from cadalign.settings.train import TrainStageConfig

logger = logging.getLogger(__name__)

OLD = {"output_size": 64, "overlap": 0.5, "lattice": "uniform", "window": "hann", "batch_size": 16}
TINY_MODEL = ModelConfig(image_widths=(4, 8, 16), poly_widths=(2, 4, 8), deep_supervision_levels=2, norm="group")


@dataclasses.dataclass(frozen=True)
class Case:
    """A tile to realign: image, noisy labels and truth in its pixel coordinates."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    truth: np.ndarray
    truth_ids: np.ndarray


def study_cases(study: Path, params: Path, names: list[str]) -> list[Case]:
    """The named tiles of a study (all of them if ``names`` is empty)."""
    cases = []
    for t in load_labelled_tiles(study / "cities", study / "labels" / "round0", sorted(load_cities(params))):
        if names and t.name not in names:
            continue
        truth, truth_ids = to_pixels(read_polygons(study / "truth" / t.city / f"{t.name}.gpkg"), t.tile.info.transform, t.tile.info.crs)
        cases.append(Case(t.name, t.tile.image, t.geoms, t.ids, truth, truth_ids))
    if not cases:
        raise FileNotFoundError(f"no tile named {names} under {study}/labels/round0; pass --tiles with existing tile names")
    return cases


def synthetic_case(size: int, max_displacement: float) -> Case:
    """A seeded synthetic tile whose labels are the truth moved by a smooth random field."""
    tile = generate_tile(size, "dense", seed=0)
    field = noise.random_displacement_field((size, size), max_displacement, 30, np.random.default_rng(1))
    return Case(f"synthetic{size}", tile.image, noise.misalign(tile.polygons, field), tile.ids, tile.polygons, tile.ids)


def seeded_models(model_cfg: ModelConfig, factors: tuple[int, ...]) -> dict[int, torch.nn.Module]:
    models = {}
    for ds in factors:
        torch.manual_seed(ds)
        models[ds] = AlignNet(model_cfg).eval()
    return models


def median_error(case: Case, moved: np.ndarray) -> float:
    errors, _, _ = evaluate.vertex_errors(case.truth, case.truth_ids, moved, case.ids, where=case.name)
    return evaluate.summarize(errors)["median_error_px"]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def vertex_difference(case: Case, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """|a - b| of two (2, H, W) fields at the label vertices, px."""
    xy = shapely.get_coordinates(case.labels)
    diff = np.hypot(*(noise.sample_field(a, xy) - noise.sample_field(b, xy)).T)
    return {"median": float(np.median(diff)), "p99": float(np.percentile(diff, 99)), "max": float(diff.max())}


def bench_case(case: Case, models: dict, device: torch.device, old: AlignConfig, new: AlignConfig, refine: int, args: argparse.Namespace) -> dict:
    finest = models[min(models)]
    out: dict[str, Any] = {"tile": case.name, "size": list(case.image.shape[:2]), "vertices": int(len(shapely.get_coordinates(case.labels)))}
    times: dict[str, list[float]] = {"old": [], "new": []}
    fields = {}
    for _ in range(args.repeats):
        for name, cfg in (("old", old), ("new", new)):
            seconds, fields[name] = timed(lambda c=cfg: predict_field(finest, case.image, case.labels, device, c))
            times[name].append(seconds)
            print(f"{case.name}: ds-{min(models)} pass, {name}: {seconds:.2f} s", flush=True)
    out["pass_seconds"] = {k: min(v) for k, v in times.items()}
    out["pass_speedup"] = out["pass_seconds"]["old"] / out["pass_seconds"]["new"]
    out["field_difference_at_vertices_px"] = vertex_difference(case, fields["old"], fields["new"])
    out["median_error_px"] = {"input": median_error(case, case.labels)}
    out["chain_seconds"] = {}
    for name, cfg in (("new", new), ("old", old)):  # the quick one first
        seconds, moved = timed(lambda c=cfg: realign(models, case.image, case.labels, device, c, refine))
        out["chain_seconds"][name] = seconds
        out["median_error_px"][name] = median_error(case, moved)
        print(f"{case.name}: chain, {name}: {seconds:.1f} s, median error {out['median_error_px'][name]:.3f} px", flush=True)
    out["chain_speedup"] = out["chain_seconds"]["old"] / out["chain_seconds"]["new"]
    if args.compile:
        compiled = dataclasses.replace(new, compile=True)
        first, _ = timed(lambda: predict_field(finest, case.image, case.labels, device, compiled))
        steady = [timed(lambda: predict_field(finest, case.image, case.labels, device, compiled))[0] for _ in range(args.repeats)]
        eager = [timed(lambda: predict_field(finest, case.image, case.labels, device, new))[0] for _ in range(args.repeats)]
        gain = min(eager) - min(steady)
        out["compile"] = {
            "first_pass_seconds": first, "compiled_pass_seconds": min(steady), "eager_pass_seconds": min(eager),
            "compile_seconds": first - min(steady), "gain_per_pass_seconds": gain,
            "passes_to_break_even": (first - min(steady)) / gain if gain > 0 else None,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--study", type=Path, default=Path("data"), help="folder with cities/, labels/round0/, truth/")
    parser.add_argument("--models", type=Path, default=None, help="ds<f>.pt networks (default: <study>/models/round1)")
    parser.add_argument("--tiles", default="", help="comma-separated tile names (default: the first tile)")
    parser.add_argument("--tiny", action="store_true", help="seeded tiny networks on a synthetic 128 px tile")
    parser.add_argument("--size", type=int, default=1024, help="side of the synthetic tile, px (without a study)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--output-size", default="auto", help="new: largest output window, px, or auto")
    parser.add_argument("--overlap", type=float, default=0.125, help="new: fraction of a window shared")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="new: activation budget per forward pass, MB")
    parser.add_argument("--batch-size", type=int, default=8, help="new: most windows per forward pass")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timings of the ds-1 pass")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the new settings")
    parser.add_argument(
        "--norm-window", default="window", help="new: GroupNorm statistics, 'window' or an output size (64: the old windows')"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    stage = load_section(args.params, "realign", RealignStageConfig)
    common = dataclasses.replace(stage.window, progress=False, compile=False)
    old = dataclasses.replace(common, **OLD)
    size = args.output_size if args.output_size == "auto" else int(args.output_size)
    norm_window = args.norm_window if args.norm_window == "window" else int(args.norm_window)
    new = dataclasses.replace(
        common,
        output_size=size,
        overlap=args.overlap,
        lattice="fit",
        window="tukey",
        memory_mb=args.memory_mb,
        batch_size=args.batch_size,
        norm_window=norm_window,
    )
    models_dir = args.models or args.study / "models" / "round1"
    trained = not args.tiny and models_dir.is_dir() and any(models_dir.glob("ds*.pt"))
    if trained:
        models = load_models(models_dir, device)
        cases = study_cases(args.study, args.params, [t for t in args.tiles.split(",") if t])
        cases = cases if args.tiles else cases[:1]
    else:
        train_cfg = load_section(args.params, "train", TrainStageConfig)
        model_cfg = TINY_MODEL if args.tiny else train_cfg.model
        models = seeded_models(model_cfg, (2, 1) if args.tiny else tuple(train_cfg.factors))
        cases = [synthetic_case(128 if args.tiny else args.size, 6.0 if args.tiny else 24.0)]
    finest = models[min(models)]
    results = {
        "device": str(device), "threads": args.threads, "trained_networks": trained,
        "models": str(models_dir) if trained else "seeded untrained", "factors": sorted(models, reverse=True),
        "refine": stage.refine, "old": dataclasses.asdict(old), "new": dataclasses.asdict(new),
        "new_auto_output_size": auto_output_size(finest, new.memory_mb),
        "cases": [bench_case(c, models, device, old, new, stage.refine, args) for c in cases],
    }
    print(f"device {device}, {args.threads} threads, networks: {results['models']}, factors {results['factors']} + refine {stage.refine}")
    print("tile            pass old s  pass new s  speed-up  chain old s  chain new s  speed-up  median err input/old/new px  field diff med/p99 px")
    for c in results["cases"]:
        e, d = c["median_error_px"], c["field_difference_at_vertices_px"]
        print(
            f"{c['tile']:<15} {c['pass_seconds']['old']:>10.2f}  {c['pass_seconds']['new']:>10.2f}  {c['pass_speedup']:>8.1f}"
            f"  {c['chain_seconds']['old']:>11.1f}  {c['chain_seconds']['new']:>11.1f}  {c['chain_speedup']:>8.1f}"
            f"  {e['input']:.3f} / {e['old']:.3f} / {e['new']:.3f}          {d['median']:.3f} / {d['p99']:.3f}"
        )
        if "compile" in c:
            k = c["compile"]
            print(f"  compile: {k['compile_seconds']:.1f} s once, pass {k['eager_pass_seconds']:.2f} s eager -> {k['compiled_pass_seconds']:.2f} s compiled")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
