"""bench/gpu_check: its CPU mode end to end (the report's JSON and markdown), and how it reports a bad benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cadalign.presets import compose

REPO = Path(__file__).resolve().parents[1]


def _load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_check()


@pytest.fixture
def fake_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put a script of the given text in place of bench 'train'; returns a runner of run_bench."""

    def run(text: str | None, limit_s: float = 60.0) -> dict:
        script = tmp_path / "bench_fake.py"
        if text is not None:
            script.write_text(text)
        monkeypatch.setitem(gpu_check.BENCHES, "train", (str(script), []))
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        return gpu_check.run_bench("train", "cpu-tiny", tmp_path / "p.yaml", out, dict(os.environ), limit_s,
                                   gpu_check.GpuSampler())

    return run


def test_a_missing_or_broken_bench_is_reported_not_faked(fake_bench) -> None:
    missing = fake_bench(None)
    assert missing["status"] == "missing" and "does not exist" in missing["error"] and "figures" not in missing
    no_flags = fake_bench("import argparse\nargparse.ArgumentParser().parse_args()\n")
    assert no_flags["status"] == "failed: does not take its flags"
    assert "unrecognized arguments: --tiny --json" in no_flags["error"] and "figures" not in no_flags
    silent = fake_bench("print('done')\n")
    assert silent["status"] == "failed" and "no bench_train.json written" in silent["error"]
    slow = fake_bench("import time\ntime.sleep(60)\n", limit_s=1.0)
    assert slow["status"] == "timed out" and 1.0 <= slow["wall_s"] < 30
    good = fake_bench("import json, sys\njson.dump({'rate': 12.5}, open(sys.argv[-1], 'w'))\n")
    assert good["status"] == "ok" and good["figures"] == {"rate": 12.5} and good["wall_s"] > 0


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """The CPU mode run once through the shell entry point (a few minutes on 2 busy cores)."""
    root = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), "--cpu-tiny", "--deadline-min", "60", "--out", str(root / "report"),
         "--keep-study", str(root / "keep")],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((root / "report" / "gpu_check.json").read_text())
    return report, (root / "report" / "gpu_check.md").read_text(), root / "keep" / "study"


def _table(md: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header row starts with ``header``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_cpu_tiny_report_holds_every_figure(tiny_check) -> None:
    report, _, study = tiny_check
    assert report["mode"] == "cpu-tiny"
    assert list(report["benches"]) == ["train", "sampler", "realign", "similarity"]
    for name, bench in report["benches"].items():
        script = REPO / gpu_check.BENCHES[name][0]
        assert (bench["status"] == "missing") == (not script.is_file())
        assert ("figures" in bench) == (bench["status"] == "ok")
    train = report["benches"]["train"]
    assert train["status"] == "ok" and train["figures"]["modes"]["eager-fp32"]["patches_per_s"] > 0
    if shutil.which("nvidia-smi") is None:  # no GPU: nothing sampled, nothing invented
        assert report["machine"]["gpu"] is None and train["gpu_busy_share"] is None and train["gpu_peak_mib"] is None

    s = report["study"]
    assert s["status"] == "ok" and s["preset"] == "tiny"
    params = compose(REPO / "conf", "tiny")
    rounds = list(params["rounds"])
    expected = {f"{st}@{r}" for st in ("train", "realign", "analyze") for r in rounds} | {"initialize", "compare"}
    names = [st["name"] for st in s["stages"]]
    assert expected <= set(names) and len(names) == len(set(names))
    assert all(st["wall_s"] > 0 for st in s["stages"]) and sum(st["wall_s"] for st in s["stages"]) <= s["wall_s"]
    # the training rates: the median of each network's log rows after the first, from the logs themselves
    logs = [row for p in sorted((study / "data" / "train_logs").glob("*.csv")) for row in _csv(p)]
    factors = {r: sorted(params["train"]["round_factors"].get(r, params["train"]["factors"]), reverse=True) for r in rounds}
    assert [(t["round"], t["ds"]) for t in s["training"]] == [(r, ds) for r in rounds for ds in factors[r]]
    for t in s["training"]:
        rates = [float(row["patches_per_s"]) for row in logs if (row["round"], int(row["ds"])) == (t["round"], t["ds"])]
        assert t["patches_per_s"] == statistics.median(rates[1:])
    for k in range(len(rounds) + 1):
        metrics = json.loads((study / "data" / "eval" / f"round{k}" / "metrics.json").read_text())
        assert s["median_error_px"][f"round{k}"] == metrics["median_error_px"]
    assert set(s["similarity"]) == set(rounds)


def _csv(path: Path) -> list[dict[str, str]]:
    header, *rows = path.read_text().splitlines()
    return [dict(zip(header.split(","), row.split(","), strict=True)) for row in rows]


@pytest.mark.slow
def test_cpu_tiny_markdown_shows_the_json_figures(tiny_check) -> None:
    report, md, _ = tiny_check
    s = report["study"]
    stages = {row[0].removesuffix(" (unfinished)"): float(row[1]) for row in _table(md, "stage")}
    assert stages.keys() == {st["name"] for st in s["stages"]}
    assert all(abs(stages[st["name"]] - st["wall_s"]) <= 0.05 for st in s["stages"])
    errors = {row[0]: float(row[1]) for row in _table(md, "labels")}
    assert errors.keys() == s["median_error_px"].keys()
    assert all(abs(errors[r] - v) <= 5e-4 for r, v in s["median_error_px"].items())
    rates = [(row[0], int(row[1]), float(row[2].replace(",", ""))) for row in _table(md, "training")]
    assert [(r, ds) for r, ds, _ in rates] == [(t["round"], t["ds"]) for t in s["training"]]
    assert all(abs(rate - t["patches_per_s"]) <= 0.05 for (_, _, rate), t in zip(rates, s["training"], strict=True))
    benches = {row[0]: row[1] for row in _table(md, "bench")}
    assert benches == {name: b["status"] for name, b in report["benches"].items()}
    eager = report["benches"]["train"]["figures"]["modes"]["eager-fp32"]["patches_per_s"]
    shown = re.search(r"- modes\.eager-fp32\.patches_per_s: ([\d,.]+)", md)
    assert shown and abs(float(shown.group(1).replace(",", "")) - eager) <= 5e-4
    assert md.startswith("# GPU check (cpu-tiny)\n")
