"""One GPU check: the benchmarks and a preset's whole study, in one report (markdown + JSON).

Runs, in order, under one deadline (default 15 min):

1. the benchmarks, each as its own process with ``--json`` (``--tiny`` in the CPU mode):
   ``bench_train.py`` (training step on random tensors), ``bench_sampler.py`` (the patch
   data path), ``bench_realign.py`` (sliding-window realignment), ``bench_similarity.py``
   (per-sample gradients). A script that is missing, fails or writes no JSON is reported
   as such, with its error, and the check goes on;
2. the study of a preset (``gpu``; ``tiny`` in the CPU mode) end to end: the preset
   composed as ``dvc exp run -S preset=<name>`` composes it, then ``dvc repro`` in a
   scratch copy of the project (``src``, ``dvc.yaml``, ``conf``), stopped at the deadline.

Reported: wall time of every benchmark and stage, the GPU's busy share (mean of
``nvidia-smi``'s utilization.gpu, sampled every 0.2 s while it ran) and its peak memory
in use, each process tree's peak resident memory, the training rate of every network
(median of its log), the median vertex error of every round and the similarity
analysis' timings. Figures come from the scripts and the study's outputs only.

Usage::

    bench/gpu_check.sh                        # on a GPU machine: ~15 min; report in gpu_check/
    bench/gpu_check.sh --cpu-tiny --out DIR   # a minute or two on a CPU (CI)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cadalign.atomic import write_json, write_text
from cadalign.presets import compose

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BENCHES = {  # name -> (script, extra arguments on a GPU); train: the eager modes (compiled: docs/gpu.md)
    "train": ("bench/bench_train.py", ["--device", "cuda", "--batch-size", "32", "--warmup", "5", "--steps", "40",
                                       "--modes", "eager-fp32", "bf16-cl"]),
    "sampler": ("bench/bench_sampler.py", ["--device", "cuda", "--input-size", "220", "--batch-size", "32"]),
    "realign": ("bench/bench_realign.py", ["--device", "cuda", "--threads", "8"]),
    "similarity": ("bench/bench_similarity.py", ["--device", "cuda"]),
}
TAKES_PARAMS = ("sampler", "realign", "similarity")  # on a GPU they measure the preset's network (--params)
# seconds each benchmark may take (3 min in all on a GPU) and those kept for the study
BENCH_LIMIT_S = {
    "gpu": {"train": 60, "sampler": 40, "realign": 50, "similarity": 30},
    "cpu-tiny": dict.fromkeys(BENCHES, 120),
}
STUDY_RESERVE_S = {"gpu": 720, "cpu-tiny": 300}
STAGE_RE = re.compile(r"^Running stage '([^']+)'")


@dataclass
class GpuSampler:
    """``nvidia-smi`` utilization and memory samples, (monotonic time, util %, MiB) each."""

    samples: list[tuple[float, float, float]] = field(default_factory=list)
    name: str | None = None
    _proc: subprocess.Popen[str] | None = None

    def start(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        query = ["nvidia-smi", "--query-gpu=name,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        self._proc = subprocess.Popen([*query, "-lms", "200"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                util, mem = float(parts[-2]), float(parts[-1])
            except (ValueError, IndexError):
                continue
            self.name = ", ".join(parts[:-2])
            self.samples.append((time.monotonic(), util, mem))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def window(self, start: float, end: float) -> dict[str, float | None]:
        """Busy share (0-1) and peak memory (MiB) of the samples in [start, end]."""
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return {"gpu_busy_share": None, "gpu_peak_mib": None}
        return {
            "gpu_busy_share": statistics.fmean(u for u, _ in inside) / 100,
            "gpu_peak_mib": max(m for _, m in inside),
        }


def run_tree(cmd: list[str], cwd: Path, env: dict[str, str], limit_s: float, log: Path,
             on_line: Any = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group, its output to ``log``, killed after ``limit_s``.

    Returns:
        ``rc`` (None when killed), ``timed_out``, ``wall_s`` and ``host_peak_mib`` (the
        largest resident set of the process tree, from wait4).
    """
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        timer = threading.Timer(max(limit_s, 0.0), _kill_group, [proc.pid])
        timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if on_line is not None:
                on_line(line, time.monotonic())
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
    killed = os.WIFSIGNALED(status)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": None if killed else proc.returncode,
        "timed_out": killed and time.monotonic() - start >= limit_s,
        "wall_s": time.monotonic() - start,
        "host_peak_mib": usage.ru_maxrss / 1024,  # KiB on Linux
    }


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(10)


def _tail(path: Path, lines: int = 8) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_bench(name: str, mode: str, params: Path, out: Path, env: dict[str, str], limit_s: float,
              gpu: GpuSampler) -> dict[str, Any]:
    """Run one benchmark script; its figures from its ``--json``, or why there are none."""
    script, gpu_args = BENCHES[name]
    flags = ["--tiny"] if mode == "cpu-tiny" else gpu_args
    if mode == "gpu" and name in TAKES_PARAMS:
        flags = [*flags, "--params", str(params)]
    json_path = out / f"bench_{name}.json"
    cmd = [sys.executable, script, *flags, "--json", str(json_path)]
    entry: dict[str, Any] = {"command": " ".join(["python", script, *flags, "--json", json_path.name])}
    if not (REPO / script).is_file():
        return {**entry, "status": "missing", "error": f"{script} does not exist"}
    json_path.unlink(missing_ok=True)
    start = time.monotonic()
    done = run_tree(cmd, REPO, env, limit_s, out / f"bench_{name}.log")
    entry.update(wall_s=done["wall_s"], host_peak_mib=done["host_peak_mib"], **gpu.window(start, time.monotonic()))
    if done["timed_out"]:
        return {**entry, "status": "timed out", "error": f"stopped after {limit_s:.0f} s"}
    log_tail = _tail(out / f"bench_{name}.log")
    if done["rc"] != 0:
        lacks = "unrecognized arguments" in log_tail
        status = "failed: does not take its flags" if lacks else "failed"
        return {**entry, "status": status, "error": log_tail}
    if not json_path.is_file():
        return {**entry, "status": "failed", "error": f"exit 0 but no {json_path.name} written"}
    return {**entry, "status": "ok", "figures": json.loads(json_path.read_text())}


def scratch_project(root: Path, params: dict[str, Any]) -> Path:
    """A copy of the project (src, dvc.yaml, conf) in ``root/study``, ``params`` as params.yaml, DVC set up."""
    proj = root / "study"
    shutil.copytree(REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "conf", proj / "conf")
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    return proj


def run_study(preset: str, root: Path, out: Path, env: dict[str, str], limit_s: float,
              gpu: GpuSampler) -> dict[str, Any]:
    """``dvc repro`` of the preset's study, timed per stage, with its results."""
    proj = scratch_project(root, compose(REPO / "conf", preset))
    starts: list[tuple[str, float]] = []
    entry: dict[str, Any] = {"preset": preset, "command": f"dvc repro (params: conf preset {preset})"}
    done = run_tree(["dvc", "repro"], proj, {**env, "PYTHONPATH": str(proj / "src")}, limit_s,
                    out / "study.log", on_line=lambda line, t: _stage_start(line, t, starts))
    end = time.monotonic()
    bounds = [t for _, t in starts[1:]] + [end]
    entry["stages"] = [
        {"name": name, "wall_s": stop - begin, **gpu.window(begin, stop)}
        for (name, begin), stop in zip(starts, bounds, strict=True)
    ]
    entry.update(wall_s=done["wall_s"], host_peak_mib=done["host_peak_mib"])
    if done["timed_out"]:
        entry["status"] = f"timed out after {limit_s:.0f} s in {starts[-1][0] if starts else 'its start'}"
        entry["stages"][-1:] = [{**entry["stages"][-1], "unfinished": True}] if starts else []
    elif done["rc"] != 0:
        entry["status"] = "failed"
        entry["error"] = _tail(out / "study.log", 15)
    else:
        entry["status"] = "ok"
    entry["training"] = training_rates(proj / "data" / "train_logs")
    entry["median_error_px"] = {
        p.parent.name: json.loads(p.read_text())["median_error_px"]
        for p in sorted((proj / "data" / "eval").glob("round*/metrics.json"))
    }
    timings = ("wall_seconds", "patches_per_second", "peak_memory_bytes")
    entry["similarity"] = {
        p.parent.name: {k: json.loads(p.read_text()).get(k) for k in timings}
        for p in sorted((proj / "data" / "similarity").glob("round*/metrics.json"))
    }
    return entry


def _stage_start(line: str, t: float, starts: list[tuple[str, float]]) -> None:
    match = STAGE_RE.match(line)
    if match:
        starts.append((match.group(1), t))


def training_rates(logs: Path) -> list[dict[str, Any]]:
    """Median patches/s of every network of every round's training log (its first row is warm-up)."""
    rows: dict[tuple[str, int], list[float]] = {}
    for path in sorted(logs.glob("*.csv")):
        lines = path.read_text().splitlines()
        header = lines[0].split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=True))
            rows.setdefault((row["round"], int(row["ds"])), []).append(float(row["patches_per_s"]))
    return [
        {"round": r, "ds": ds, "patches_per_s": statistics.median(rates[1:] or rates), "log_rows": len(rates)}
        for (r, ds), rates in rows.items()
    ]


def machine() -> dict[str, Any]:
    """Host, versions and GPU (from nvidia-smi: no CUDA context in this process, whose memory it would count)."""
    import torch

    gpu = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip() or None
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "cpus": os.cpu_count(),
    }


def fmt(value: Any, digits: int = 1) -> str:
    """A figure as the markdown shows it ("-" for none)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _flat(figures: Any, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(figures, dict):
        return [kv for k, v in figures.items() for kv in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(figures, (int, float)) and not isinstance(figures, bool):
        return [(prefix, figures)]
    return []


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: every figure of the JSON that a person reads, formatted by :func:`fmt`."""
    m = report["machine"]
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"{m['gpu'] or 'no GPU'}, {m['cpus']} CPUs, torch {m['torch']}, CUDA {m['cuda'] or '-'}; "
        f"{fmt(report['wall_s'])} s in all (deadline {fmt(report['deadline_s'], 0)} s).",
        "",
        "## Benchmarks",
        "",
        "| bench | status | wall s | GPU busy | GPU peak MiB | host peak MiB | command |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, b in report["benches"].items():
        lines.append(
            f"| {name} | {b['status']} | {fmt(b.get('wall_s'))} | {fmt(b.get('gpu_busy_share'), 2)} | "
            f"{fmt(b.get('gpu_peak_mib'), 0)} | {fmt(b.get('host_peak_mib'), 0)} | `{b['command']}` |"
        )
    for name, b in report["benches"].items():
        if b["status"] == "ok":
            lines += ["", f"### {name}", ""] + [f"- {k}: {fmt(v, 3)}" for k, v in _flat(b["figures"])]
        else:
            lines += ["", f"### {name}: {b['status']}", "", "```", b.get("error", ""), "```"]
    s = report["study"]
    lines += [
        "",
        f"## Study: preset {s['preset']} ({s['status']})",
        "",
        f"`{s['command']}`: {fmt(s.get('wall_s'))} s, host peak {fmt(s.get('host_peak_mib'), 0)} MiB.",
        "",
        "| stage | wall s | GPU busy | GPU peak MiB |",
        "| --- | --- | --- | --- |",
    ]
    for st in s.get("stages", []):
        name = st["name"] + (" (unfinished)" if st.get("unfinished") else "")
        busy, peak = fmt(st["gpu_busy_share"], 2), fmt(st["gpu_peak_mib"], 0)
        lines.append(f"| {name} | {fmt(st['wall_s'])} | {busy} | {peak} |")
    lines += ["", "| training | ds | patches/s (median of the log) |", "| --- | --- | --- |"]
    lines += [f"| {t['round']} | {t['ds']} | {fmt(t['patches_per_s'])} |" for t in s.get("training", [])]
    lines += ["", "| labels | median error px |", "| --- | --- |"]
    lines += [f"| {r} | {fmt(v, 3)} |" for r, v in s.get("median_error_px", {}).items()]
    lines += ["", "| similarity | wall s | patches/s | peak memory MiB |", "| --- | --- | --- | --- |"]
    for r, v in s.get("similarity", {}).items():
        peak = None if v["peak_memory_bytes"] is None else v["peak_memory_bytes"] / 2**20
        lines.append(f"| {r} | {fmt(v['wall_seconds'])} | {fmt(v['patches_per_second'])} | {fmt(peak, 0)} |")
    if s.get("error"):
        lines += ["", "```", s["error"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the check, write ``gpu_check.json`` and ``gpu_check.md``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny benchmarks and the tiny preset on the CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder of the report and the logs")
    parser.add_argument("--deadline-min", type=float, default=15.0, help="the whole check stops by then")
    parser.add_argument("--preset", default=None, help="the study's preset (default gpu; --cpu-tiny: tiny)")
    parser.add_argument("--benches", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--keep-study", type=Path, default=None,
                        help="run the study in this new folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    began = time.monotonic()
    deadline = began + args.deadline_min * 60
    mode = "cpu-tiny" if args.cpu_tiny else "gpu"
    preset = args.preset or ("tiny" if args.cpu_tiny else "gpu")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CADALIGN_LOG_LEVEL": os.environ.get("CADALIGN_LOG_LEVEL", "WARNING")}
    if args.cpu_tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode measures the CPU even on a GPU machine
    report: dict[str, Any] = {
        "mode": mode, "deadline_s": args.deadline_min * 60, "machine": machine(), "benches": {}
    }
    gpu = GpuSampler().start()
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
            params = Path(tmp) / "params.yaml"
            params.write_text(yaml.safe_dump(compose(REPO / "conf", preset), sort_keys=False))
            for name in args.benches:
                limit = min(BENCH_LIMIT_S[mode][name], deadline - STUDY_RESERVE_S[mode] - time.monotonic())
                if limit < 5:
                    status = "not run: the time left is the study's"
                    report["benches"][name] = {"status": status, "command": BENCHES[name][0]}
                    continue
                logger.info("benchmark %s (at most %.0f s)", name, limit)
                report["benches"][name] = run_bench(name, mode, params, args.out, env, limit, gpu)
            logger.info("study of preset %s (at most %.0f s)", preset, deadline - time.monotonic())
            root = args.keep_study or Path(tmp)
            try:
                report["study"] = run_study(preset, root, args.out, env, deadline - time.monotonic(), gpu)
            except Exception as err:  # the benchmarks' figures still reach the report
                logger.exception("the study could not run")
                report["study"] = {"preset": preset, "command": "dvc repro", "status": f"failed: {err!r}"}
    finally:
        gpu.stop()
    report["wall_s"] = time.monotonic() - began
    write_json(args.out / "gpu_check.json", report)
    write_text(args.out / "gpu_check.md", render_markdown(report))
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
