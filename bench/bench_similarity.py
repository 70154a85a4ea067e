"""Benchmark of per-sample output gradients and the linear-time N_S on the alignment network.

Measures, on one model and device, after warm-up:

- throughput (samples/s) of the per-sample gradient paths: the per-layer hooks and
  torch.func vmap (batched, at the given chunk sizes) and the per-sample backward loop;
- a plain training step (forward + backward of a loss over a batch, all parameters) in
  samples/s, and the practical ceiling of per-sample gradients, 1/d of it (d = 2 outputs
  need d backward passes);
- the time of the linear-time N_S arithmetic (both passes, whitening included, gradient
  chunks precomputed and reused) for |D| and 4|D| samples, and their ratio (4 if linear).

Usage::

    python bench/bench_similarity.py --small                 # CPU, small widths
    python bench/bench_similarity.py --device cuda --tf32    # reference widths on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from cadalign.model import AlignNet, ModelConfig
from cadalign.similarity.density import soft_counts_linear
from cadalign.similarity.grads import alignment_output_fn, per_sample_grads, per_sample_grads_loop

logger = logging.getLogger(__name__)

REFERENCE_WIDTHS = ((32, 64, 128, 256), (16, 32, 64, 128))
SMALL_WIDTHS = ((8, 16, 32, 64), (4, 8, 16, 32))


def nearest_valid_size(net: AlignNet, wanted: int) -> int:
    """The valid input size of ``net`` closest to ``wanted`` (ties: the smaller).

    Args:
        net: The network.
        wanted: Desired patch side in pixels.

    Returns:
        A valid input side.
    """
    candidates = {net.input_size(o) for o in range(1, wanted + 1)}
    return min(candidates, key=lambda s: (abs(s - wanted), s))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], object], n_samples: int, device: torch.device, repeats: int) -> float:
    """Samples per second of ``fn`` (which processes ``n_samples``), after one warm-up call.

    Args:
        fn: The work to time.
        n_samples: Samples processed by one call.
        device: Device to synchronise.
        repeats: Timed calls (the best is kept).

    Returns:
        Samples per second of the fastest timed call.
    """
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return n_samples / best


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a table (optionally also write JSON).

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument(
        "--small", action="store_true", help=f"widths {SMALL_WIDTHS} instead of {REFERENCE_WIDTHS}"
    )
    parser.add_argument("--patch", type=int, default=124, help="patch side; the nearest valid size is used")
    parser.add_argument("--batch", type=int, default=32, help="samples per batched measurement")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 32], help="chunks of the batched paths")
    parser.add_argument("--loop-samples", type=int, default=8, help="samples timed with the per-sample loop")
    parser.add_argument("--train-batch", type=int, default=32, help="batch of the plain training step")
    parser.add_argument("--dataset", type=int, default=256, help="|D| for the N_S timing (also 4|D|)")
    parser.add_argument("--ns-chunk", type=int, default=16, help="gradient chunk size for the N_S timing")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (best kept)")
    parser.add_argument("--mode", choices=["sum", "center"], default="sum", help="output map differentiated")
    parser.add_argument("--methods", nargs="+", default=["hooks", "vmap"], choices=["hooks", "vmap"])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    widths = SMALL_WIDTHS if args.small else REFERENCE_WIDTHS
    torch.manual_seed(args.seed)
    net = AlignNet(ModelConfig(image_widths=widths[0], poly_widths=widths[1])).to(device).eval()
    size = nearest_valid_size(net, args.patch)
    params = net.disp_parameters()
    n_params = sum(p.numel() for _, p in params)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_in = max(args.batch, args.train_batch, args.loop_samples)
    image = torch.rand(n_in, 3, size, size, generator=gen, device=device) * 2 - 1
    polys = (torch.rand(n_in, 3, size, size, generator=gen, device=device) > 0.8).float()
    fn = alignment_output_fn(args.mode)
    d = 2
    logger.info(
        "device %s, widths %s, patch %d px -> output %d px, %d disp parameters (%d total)",
        device, widths, size, net.output_size(size), n_params, sum(p.numel() for p in net.parameters()),
    )
    results: dict[str, float | int | str] = {"device": str(device), "patch": size, "params": n_params}

    def train_step() -> None:
        out = net(image[: args.train_batch], polys[: args.train_batch])
        loss = sum(x.square().mean() for x in out.disp) + sum(s.mean() for s in out.seg)
        loss.backward()
        net.zero_grad(set_to_none=True)

    results["train_step"] = rate(train_step, args.train_batch, device, args.repeats)
    ceiling = results["train_step"] / d
    loop_in = (image[: args.loop_samples], polys[: args.loop_samples])
    results["loop"] = rate(
        lambda: per_sample_grads_loop(net, params, loop_in, fn), args.loop_samples, device, args.repeats
    )
    batch_in = (image[: args.batch], polys[: args.batch])
    for method in args.methods:
        for chunk in args.chunks:
            results[f"{method}@{chunk}"] = rate(
                lambda m=method, c=chunk: per_sample_grads(net, params, batch_in, fn, chunk_size=c, method=m),
                args.batch, device, args.repeats,
            )
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    chunk_grads = per_sample_grads(net, params, (image[: args.ns_chunk], polys[: args.ns_chunk]), fn)

    def source(n: int) -> Callable[[], Iterator[Tensor]]:
        return lambda: (chunk_grads for _ in range(max(1, n // args.ns_chunk)))

    for label, n in (("ns_D", args.dataset), ("ns_4D", 4 * args.dataset)):
        results[label] = n / rate(lambda n=n: soft_counts_linear(source(n)), n, device, args.repeats)
    results["ns_ratio"] = results["ns_4D"] / results["ns_D"]

    print(f"per-sample output gradients, {device}, patch {size} px, p = {n_params}, d = {d}")
    train, loop = results["train_step"], results["loop"]
    print(f"  plain training step       {train:10.1f} samples/s  -> ceiling 1/d = {ceiling:.1f}/s")
    print(f"  per-sample loop           {loop:10.1f} samples/s  ({loop / ceiling:.0%} of ceiling)")
    for method in args.methods:
        for chunk in args.chunks:
            r = results[f"{method}@{chunk}"]
            print(
                f"  {method:5s} chunk {chunk:4d}        {r:10.1f} samples/s  ({r / ceiling:.0%} of ceiling, "
                f"{r / results['loop']:.1f}x loop)"
            )
    if "peak_gib" in results:
        print(f"  peak GPU memory           {results['peak_gib']:10.2f} GiB")
    print(
        f"N_S arithmetic (2 passes): |D| = {args.dataset}: {results['ns_D']:.3f} s, "
        f"4|D|: {results['ns_4D']:.3f} s, "
        f"ratio {results['ns_ratio']:.2f} (4 = linear)"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
