"""Training throughput of the alignment network: eager float32 vs the optimized path.

Times full training steps (forward, loss, backward, AdamW step) on random tensors, after
warm-up (which also absorbs torch.compile's compilation), in one run:

- ``eager-fp32``: the plain model, strict float32 (TF32 off), NCHW;
- ``eager-tf32``: the same with TF32 tensor-core matmuls/convolutions (CUDA only; training
  allows TF32 wherever it runs float32);
- ``bf16-cl``: bfloat16 autocast + channels_last, eager (CUDA only);
- ``optimized``: on CUDA bfloat16 autocast + channels_last + torch.compile (the path of
  :func:`cadalign.train.train`); on CPU torch.compile alone in float32 (bf16 autocast is
  skipped, as training runs float32 there, and channels_last is left out: it was slower
  with compile on CPU here).

Usage::

    python bench/bench_train.py                       # reference model, 220 px, batch 8
    python bench/bench_train.py --device cpu --image-widths 8 16 32 64 \\
        --poly-widths 4 8 16 32 --batch-size 2 --steps 5
    python bench/bench_train.py --tiny --json out.json   # seconds on a CPU (CI, bench/gpu_check.sh)

The results are printed as a table (the script's output, not a log); ``--json`` also writes
them. ``--tiny`` times a network of a few thousand weights on 60 px patches, uncompiled.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cadalign.model import AlignNet, LossConfig, ModelConfig, alignment_loss
from cadalign.train import Runtime, TrainConfig, setup_runtime

from benchargs import add_tiny_and_json, parse_args

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Mode:
    """One way of running the training step."""

    name: str
    tf32: bool  # TF32 tensor cores for float32 matmuls/convolutions (CUDA)
    fast: bool  # bf16 autocast + channels_last (CUDA)
    compile: bool  # torch.compile


MODES = {
    "eager-fp32": Mode("eager-fp32", tf32=False, fast=False, compile=False),
    "eager-tf32": Mode("eager-tf32", tf32=True, fast=False, compile=False),
    "bf16-cl": Mode("bf16-cl", tf32=True, fast=True, compile=False),
    "optimized": Mode("optimized", tf32=True, fast=True, compile=True),
}
CUDA_ONLY = ("eager-tf32", "bf16-cl")


def make_step(
    model_cfg: ModelConfig, rt: Runtime, batch_size: int, input_size: int, mode: Mode, seed: int
) -> Callable[[], float]:
    """Build a model, an optimizer and a random batch; return a function doing one step.

    Args:
        model_cfg: network settings.
        rt: device and precision (autocast used only by the bf16 modes on CUDA).
        batch_size: patches per step.
        input_size: patch side (a valid input size of the network).
        mode: precision, layout and compilation of the step.
        seed: seed of the weights and the random batch.

    Returns:
        A function running one training step and returning the loss.
    """
    torch.manual_seed(seed)
    model = AlignNet(model_cfg).to(rt.device)
    out = model.output_size(input_size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    image = (torch.rand(batch_size, 3, input_size, input_size, generator=g) * 2 - 1).to(rt.device)
    polys = (torch.rand(batch_size, 3, input_size, input_size, generator=g) > 0.7).float().to(rt.device)
    disp = (torch.rand(batch_size, 2, out, out, generator=g) - 0.5).to(rt.device)
    seg = (torch.rand(batch_size, 4, out, out, generator=g) > 0.5).float().to(rt.device)
    margin = (input_size - out) // 2
    polys_out = polys[..., margin : margin + out, margin : margin + out].contiguous()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_cfg = LossConfig()
    net: torch.nn.Module = model
    fast = mode.fast and rt.device.type == "cuda"
    if fast:
        model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
        polys = polys.contiguous(memory_format=torch.channels_last)
    if mode.compile:
        net = torch.compile(model)

    torch.backends.cuda.matmul.allow_tf32 = mode.tf32  # global: set for the steps timed next
    torch.backends.cudnn.allow_tf32 = mode.tf32

    def step() -> float:
        with rt.autocast() if fast else torch.autocast(rt.device.type, enabled=False):
            prediction = net(image, polys)
        loss, _ = alignment_loss(prediction, disp, seg, polys_out, 0, loss_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def measure(step: Callable[[], float], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step, averaged over ``steps`` after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


TINY = {"input_size": 60, "image_widths": [4, 8], "poly_widths": [2, 4], "batch_size": 2, "warmup": 1, "steps": 2}


def main() -> None:
    """Parse arguments, time the modes, print the table (and write the JSON)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = ModelConfig()
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=220, help="patch side in px (valid input)")
    parser.add_argument("--image-widths", type=int, nargs="+", default=list(defaults.image_widths))
    parser.add_argument("--poly-widths", type=int, nargs="+", default=list(defaults.poly_widths))
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (include compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=None,
        help="modes to time (CUDA-only ones skip on CPU; default all, --tiny: the eager ones)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_tiny_and_json(parser, TINY, "a tiny network and batch, seconds on a CPU")
    args = parse_args(parser, TINY)
    modes_asked = args.modes or [m for m in MODES if not (args.tiny and MODES[m].compile)]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(
        image_widths=tuple(args.image_widths),
        poly_widths=tuple(args.poly_widths),
        deep_supervision_levels=min(3, len(args.image_widths) - 1),
    )
    rt = setup_runtime(TrainConfig(device=args.device, amp=True, seed=args.seed))
    probe = AlignNet(model_cfg)
    out_size = probe.output_size(args.input_size)  # raises with valid sizes named
    n_params = sum(p.numel() for p in probe.parameters())
    on_cuda = rt.device.type == "cuda"
    device_name = torch.cuda.get_device_name(rt.device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {rt.device} {device_name}; torch {torch.__version__}")
    print(
        f"model: image_widths={model_cfg.image_widths} poly_widths={model_cfg.poly_widths} "
        f"({n_params / 1e6:.2f} M parameters); input {args.input_size} px -> output {out_size} px"
    )
    print(f"batch: {args.batch_size} patches; {args.warmup} warm-up + {args.steps} timed steps per mode")
    if not on_cuda:
        print("note: bf16 autocast skipped on CPU (training runs float32 there);")
        print("      optimized = torch.compile in float32, NCHW")

    modes = [MODES[m] for m in modes_asked if on_cuda or m not in CUDA_ONLY]
    results: dict[str, dict[str, float]] = {}
    for mode in modes:
        logger.info("timing %s", mode.name)
        step = make_step(model_cfg, rt, args.batch_size, args.input_size, mode, args.seed)
        seconds = measure(step, rt.device, args.warmup, args.steps)
        results[mode.name] = {"ms_per_step": seconds * 1e3, "patches_per_s": args.batch_size / seconds}
        suffix = " (bf16+channels_last+compile)" if on_cuda else " (fp32+compile)"
        label = mode.name + (suffix if mode.name == "optimized" else "")
        print(f"{label:<40s} {seconds * 1e3:9.1f} ms/step {results[mode.name]['patches_per_s']:9.1f} patches/s")
    speedups = {
        name: rate["patches_per_s"] / results["eager-fp32"]["patches_per_s"]
        for name, rate in results.items()
        if name != "eager-fp32" and "eager-fp32" in results
    }
    for name, ratio in speedups.items():
        print(f"speed-up {name} / eager-fp32: {ratio:.2f}x")
    if args.json is not None:
        figures = {
            "device": f"{rt.device} {device_name}",
            "torch": torch.__version__,
            "n_parameters": n_params,
            "input_size": args.input_size,
            "output_size": out_size,
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "steps": args.steps,
            "modes": results,
            "speedup_vs_eager_fp32": speedups,
        }
        if on_cuda:
            figures["peak_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
