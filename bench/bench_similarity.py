"""Benchmark of per-sample output gradients and the linear-time N_S on the alignment network.

By default it measures the network the study analyses: ``train.model`` and
``similarity.{patch_size, output, chunk_size}`` of ``params.yaml`` (``--model reference``:
the reference widths, no normalisation). On one device, after a warm-up call of each
variant, timed calls interleaved (hooks, vmap, hooks, vmap, ...) so that contention on a
shared machine hits both, best call kept:

- patches/s of the per-sample gradient paths: the per-layer hooks and torch.func vmap
  (batched, at the given chunk sizes) and the per-sample backward loop;
- a plain training step (forward + backward of a loss over a batch, all parameters) in
  patches/s, and the practical ceiling of per-sample gradients, 1/d of it (d = 2 outputs
  need d backward passes);
- agreement of the paths on the same patches: max |hooks - vmap| and |hooks - loop|, each
  relative to max |vmap|;
- the time of the linear-time N_S arithmetic (both passes, whitening included, gradient
  chunks precomputed and reused) for |D| and 4|D| samples, and their ratio (4 if linear).

Usage::

    python bench/bench_similarity.py --tiny --json out.json   # seconds: CI / a quick GPU check
    python bench/bench_similarity.py                         # the study's network, CUDA if present
    python bench/bench_similarity.py --model reference --device cuda --tf32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cadalign.config import from_dict, read_params
from cadalign.model import AlignNet, ModelConfig
from cadalign.similarity.analysis import nearest_network_input_size
from cadalign.similarity.density import soft_counts_linear
from cadalign.similarity.grads import alignment_output_fn, per_sample_grads, per_sample_grads_loop

logger = logging.getLogger(__name__)

REFERENCE = ModelConfig(image_widths=(32, 64, 128, 256), poly_widths=(16, 32, 64, 128))
METHODS = ("hooks", "vmap")


def study_setup(params: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The analysed network's settings from a params file.

    Args:
        params: params.yaml of the study.

    Returns:
        ``(train.model as ModelConfig, the raw similarity section)``.

    Raises:
        cadalign.config.ConfigError: for a missing file or a bad ``train.model``.
    """
    data = read_params(params)
    train = data.get("train") or {}
    cfg = from_dict(ModelConfig, train.get("model") or {}, where=f"{params}: train.model")
    return cfg, data.get("similarity") or {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rates(
    variants: dict[str, tuple[Callable[[], object], int]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Patches per second of each variant: one warm-up call each, then timed rounds A, B, A, B ...

    Args:
        variants: Name -> (work, number of patches it processes).
        device: Device to synchronise.
        repeats: Timed rounds (the best call of each variant is kept).

    Returns:
        Name -> patches per second of its fastest timed call.
    """
    for fn, _ in variants.values():
        fn()
    _sync(device)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, (fn, _) in variants.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n / best[name] for name, (_, n) in variants.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the study's params file")
    parser.add_argument("--model", choices=["study", "reference"], default="study",
                        help="study: train.model of --params; reference: widths of the paper's network")
    parser.add_argument("--tiny", action="store_true",
                        help="a few patches, one timed round: seconds on a CPU (CI, quick GPU checks)")
    parser.add_argument("--patch", type=int, default=None, help="patch side (default similarity.patch_size)")
    parser.add_argument("--mode", choices=["sum", "center"], default=None,
                        help="output differentiated (default similarity.output)")
    parser.add_argument("--batch", type=int, default=None, help="patches per batched measurement")
    parser.add_argument("--chunks", type=int, nargs="+", default=None,
                        help="chunks of the batched paths (default similarity.chunk_size and 64)")
    parser.add_argument("--loop-samples", type=int, default=None, help="patches timed with the per-sample loop")
    parser.add_argument("--dataset", type=int, default=None, help="|D| for the N_S timing (also 4|D|)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (best kept)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    return parser


def _settings(args: argparse.Namespace, sim: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Fill the unset sizes: from the similarity section, then --tiny, GPU or CPU defaults."""
    chunk = int(sim.get("chunk_size", 16))
    big = cuda and not args.tiny
    defaults = {
        "patch": int(sim.get("patch_size", 124)),
        "mode": sim.get("output", "sum"),
        "batch": 4 if args.tiny else (256 if big else 32),
        "chunks": [4] if args.tiny else sorted({chunk, 64 if big else 32}),
        "loop_samples": 2 if args.tiny else (16 if big else 4),
        "dataset": 32 if args.tiny else 256,
        "repeats": 1 if args.tiny else 3,
    }
    return {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table and optionally write JSON.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The figures (as written to ``--json``).
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model_cfg, sim = study_setup(args.params)
    if args.model == "reference":
        model_cfg = REFERENCE
    s = _settings(args, sim, device.type == "cuda")

    torch.manual_seed(args.seed)
    net = AlignNet(model_cfg).to(device).eval()
    size = nearest_network_input_size(net, s["patch"])
    params = net.disp_parameters()
    n_params = sum(p.numel() for _, p in params)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_in = max(s["batch"], s["loop_samples"], max(s["chunks"]))
    image = torch.rand(n_in, 3, size, size, generator=gen, device=device) * 2 - 1
    polys = (torch.rand(n_in, 3, size, size, generator=gen, device=device) > 0.8).float()
    fn = alignment_output_fn(s["mode"])
    d = 2
    logger.info(
        "device %s, %s network %s, patch %d px -> output %d px, %d disp parameters, output %s",
        device, args.model, dataclasses.asdict(model_cfg), size, net.output_size(size), n_params, s["mode"],
    )

    def train_step() -> None:
        out = net(image[: s["batch"]], polys[: s["batch"]])
        loss = sum(x.square().mean() for x in out.disp) + sum(t.mean() for t in out.seg)
        loss.backward()
        net.zero_grad(set_to_none=True)

    batch_in = (image[: s["batch"]], polys[: s["batch"]])
    loop_in = (image[: s["loop_samples"]], polys[: s["loop_samples"]])
    variants: dict[str, tuple[Callable[[], object], int]] = {"train_step": (train_step, s["batch"])}
    for chunk in s["chunks"]:
        for method in METHODS:
            variants[f"{method}@{chunk}"] = (
                lambda m=method, c=chunk: per_sample_grads(net, params, batch_in, fn, chunk_size=c, method=m),
                s["batch"],
            )
    variants["loop"] = (lambda: per_sample_grads_loop(net, params, loop_in, fn), s["loop_samples"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = interleaved_rates(variants, device, s["repeats"])
    ceiling = rates["train_step"] / d

    # Agreement on the same patches (TF32 off for a meaningful figure).
    same = (image[: s["loop_samples"]], polys[: s["loop_samples"]])
    got = {m: per_sample_grads(net, params, same, fn, chunk_size=s["chunks"][0], method=m) for m in METHODS}
    loop = per_sample_grads_loop(net, params, same, fn)
    scale = got["vmap"].abs().max().item()
    agreement = {
        "hooks_vs_vmap": (got["hooks"] - got["vmap"]).abs().max().item() / scale,
        "hooks_vs_loop": (got["hooks"] - loop).abs().max().item() / scale,
    }

    chunk_grads = got["hooks"]
    n_chunk = chunk_grads.shape[0]

    def source(n: int) -> Callable[[], Iterator[Tensor]]:
        return lambda: (chunk_grads for _ in range(max(1, n // n_chunk)))

    ns = interleaved_rates(
        {f"{n}": (lambda n=n: soft_counts_linear(source(n)), n) for n in (s["dataset"], 4 * s["dataset"])},
        device,
        s["repeats"],
    )
    ns_seconds = {key: int(key) / value for key, value in ns.items()}
    best = {m: max(rates[f"{m}@{c}"] for c in s["chunks"]) for m in METHODS}
    results: dict[str, Any] = {
        "device": str(device),
        "model": args.model,
        "model_config": dataclasses.asdict(model_cfg),
        "patch": size,
        "output_size": net.output_size(size),
        "mode": s["mode"],
        "params": n_params,
        "threads": torch.get_num_threads(),
        "tf32": args.tf32,
        "patches_per_second": rates,
        "ceiling": ceiling,
        "hooks_over_vmap": best["hooks"] / best["vmap"],
        "agreement": agreement,
        "ns_seconds_D": ns_seconds[str(s["dataset"])],
        "ns_seconds_4D": ns_seconds[str(4 * s["dataset"])],
    }
    results["ns_ratio"] = results["ns_seconds_4D"] / results["ns_seconds_D"]
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    _print(results, s)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _print(r: dict[str, Any], s: dict[str, Any]) -> None:
    rates, ceiling = r["patches_per_second"], r["ceiling"]
    print(
        f"per-sample output gradients, {r['device']}, {r['model']} network, patch {r['patch']} px, "
        f"output {r['mode']}, p = {r['params']}, d = 2, {r['threads']} thread(s)"
    )
    print(f"  plain training step       {rates['train_step']:10.1f} patches/s  -> ceiling 1/d = {ceiling:.1f}/s")
    print(f"  per-sample loop           {rates['loop']:10.1f} patches/s  ({rates['loop'] / ceiling:.0%} of ceiling)")
    for chunk in s["chunks"]:
        for method in METHODS:
            v = rates[f"{method}@{chunk}"]
            print(
                f"  {method:5s} chunk {chunk:4d}        {v:10.1f} patches/s  ({v / ceiling:.0%} of ceiling, "
                f"{v / rates['loop']:.1f}x loop)"
            )
    print(f"  hooks / vmap (best chunk) {r['hooks_over_vmap']:10.2f}")
    a = r["agreement"]
    print(f"  max |hooks - vmap| / max|g| {a['hooks_vs_vmap']:.2e}, |hooks - loop| {a['hooks_vs_loop']:.2e}")
    if "peak_gib" in r:
        print(f"  peak GPU memory           {r['peak_gib']:10.2f} GiB")
    print(
        f"N_S arithmetic (2 passes): |D| = {s['dataset']}: {r['ns_seconds_D']:.3f} s, "
        f"4|D|: {r['ns_seconds_4D']:.3f} s, ratio {r['ns_ratio']:.2f} (4 = linear)"
    )


if __name__ == "__main__":
    main()
