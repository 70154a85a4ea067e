"""`dvc repro` of the whole study on a tiny synthetic city, as a user runs it (slow: ~1-2 min), and dvc.yaml itself."""

from __future__ import annotations

import ast
import json
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_STUDY_PARAMS, make_dvc_project
from servers import mlflow_server


@pytest.mark.slow
def test_dvc_repro_whole_study(tmp_path, monkeypatch) -> None:
    params = (
        "cities:\n  minitown: {source: synthetic, style: dense, tiles: [1]}\n"
        "synthetic: {size: 384, seed: 0}\n"
        "draw: {tile: minitown1, window: [0, 0, 384, 384]}\n" + TINY_STUDY_PARAMS
    )
    proj, dvc = make_dvc_project(tmp_path, params)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    dvc("repro")
    for k in range(4):
        metrics = json.loads((proj / "data" / "eval" / f"round{k}" / "metrics.json").read_text())
        assert metrics["n_vertices"] > 0 and 0 <= metrics["auc"] <= 1
    # the DVC metrics are the headline of each label set: one short row each
    table = dvc("metrics", "show").splitlines()
    assert [line.split()[0] for line in table[1:]] == [f"data/metrics/round{k}.json" for k in range(4)]
    assert max(map(len, table)) <= 120, "\n".join(table)
    headline = json.loads((proj / "data" / "metrics" / "round3.json").read_text())
    round3 = json.loads((proj / "data" / "eval" / "round3" / "metrics.json").read_text())
    assert headline["median_px"] == round3["median_error_px"] and headline["auc"] == round3["auc"]
    for fig in ("accuracy.png", "overlay.png"):
        assert (proj / "data" / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (proj / "data" / "models" / "round2").iterdir()) == ["ds1.pt", "ds2.pt", "manifest.json"]
    # train.round_factors: round 3 has the ds-2 network alone (realign@round3 uses what the round wrote)
    assert sorted(p.name for p in (proj / "data" / "models" / "round3").iterdir()) == ["ds2.pt", "manifest.json"]
    # train.grow: round 1 starts from the coarsest network only
    assert sorted(p.name for p in (proj / "data" / "models" / "round0").iterdir()) == ["ds2.pt", "manifest.json"]
    changes = json.loads((proj / "data" / "changes" / "metrics.json").read_text())
    assert list(changes) == ["round0_to_round1", "round1_to_round2", "round2_to_round3"]
    assert all(c["ci95_low_px"] <= c["median_change_px"] <= c["ci95_high_px"] for c in changes.values())
    compare = json.loads((proj / "data" / "compare" / "metrics.json").read_text())
    assert set(compare) == {"round1", "round2", "round3", "changes"}
    assert all(compare[r]["n_patches"] > 0 for r in ("round1", "round2", "round3"))
    assert list(compare["changes"]) == ["round1_to_round2", "round2_to_round3"]
    # per-file code deps: touching the drawing module leaves every other stage up to date
    draw_module = proj / "src" / "cadalign" / "stages" / "draw.py"
    original = draw_module.read_text()
    draw_module.write_text(original + "# touched\n")
    assert set(json.loads(dvc("status", "--json"))) == {"draw"}
    draw_module.write_text(original)
    # a second repro has nothing to do
    assert "Data and pipelines are up to date" in dvc("repro") or "didn't change" in dvc("status")
    # the MLflow mirror: every stage run nested under one study run
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cadalign")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    study = [r for r in runs if r.data.tags.get("cadalign.role") == "study"]
    stages = {r.info.run_name for r in runs if r.data.tags.get("cadalign.role") == "stage"}
    assert len(study) == 1
    assert {"fetch@minitown", "misalign@minitown", "train@round1", "realign@round3", "evaluate@round3", "draw",
            "analyze@round2", "compare", "contrast"} <= stages
    train3 = next(r for r in runs if r.info.run_name == "train@round3")
    assert train3.data.tags["mlflow.parentRunId"] == study[0].info.run_id
    assert client.get_metric_history(train3.info.run_id, "ds2.loss")  # per-step losses (round 3: ds 2 alone)
    assert not client.get_metric_history(train3.info.run_id, "ds1.loss")
    _check_mlflow_server(f"sqlite:///{db}", study[0].info.run_id, proj)

    # a rerun from scratch writes the same bytes, so the same DVC hashes, for every output
    # but those that hold timings: the training logs (throughput; the checkpoints keep them too)
    # and the similarity metrics (seconds, peak memory), whose results are the same
    first = _output_hashes(proj / "dvc.lock")
    similarity = json.loads((proj / "data" / "similarity" / "round3" / "metrics.json").read_text())
    shutil.rmtree(proj / "data" / "checkpoints")  # else training resumes at its last step
    dvc("repro", "--force")
    second = _output_hashes(proj / "dvc.lock")
    assert second.keys() == first.keys() and len(first) > 20
    changed = sorted(path for path in first if second[path] != first[path])
    timed = [f"data/similarity/{r}/metrics.json" for r in ("round1", "round2", "round3")]
    timed += ["data/compare"] + [f"data/train_logs/round{k}.csv" for k in (1, 2, 3)]  # compare: their summary
    timed += [f"data/checkpoints/round{k}" for k in (1, 2, 3)]  # they keep the training log (throughput)
    assert changed == sorted(timed)
    again = json.loads((proj / "data" / "similarity" / "round3" / "metrics.json").read_text())
    timings = {"wall_seconds", "patches_per_second", "peak_memory_bytes", "seconds"}
    assert timings <= again.keys() and len(again) > 20
    results = {k: v for k, v in similarity.items() if k not in timings}
    assert {k: v for k, v in again.items() if k not in timings} == results


def _check_mlflow_server(uri: str, study_id: str, proj: Path) -> None:
    """Through a real MLflow server's REST API: the experiment opens on its runs, the study run
    has its nested stage runs and the per-round headline as series with step = round."""

    def get(base: str, path: str, **query: str) -> dict:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}") as reply:
            return json.loads(reply.read())

    with mlflow_server(uri) as base:
        exp = get(base, "experiments/get-by-name", experiment_name="cadalign")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [exp["experiment_id"]], "max_results": 500}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as reply:
            runs = json.loads(reply.read())["runs"]
        nested = {
            tag["value"]: run for run in runs for tag in run["data"].get("tags", []) if tag["key"] == "cadalign.stage"
        }
        for stage in ("train@round1", "train@round2", "train@round3", "realign@round3", "summarize"):
            tags = {t["key"]: t["value"] for t in nested[stage]["data"]["tags"]}
            assert tags["mlflow.parentRunId"] == study_id
        history = get(base, "metrics/get-history", run_id=study_id, metric_key="median_px")["metrics"]
        expected = [json.loads((proj / "data" / "metrics" / f"round{k}.json").read_text())["median_px"] for k in range(4)]
        assert sorted((m.get("step", 0), m["value"]) for m in history) == list(enumerate(expected))


def _output_hashes(lock: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def test_dvc_yaml_names_no_round_but_the_input() -> None:
    """`rounds:` in params.yaml is the one place the rounds are listed: dvc.yaml loops over it
    (foreach) or lets the stages read it, and names only the input labels (round0) itself."""
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "dvc.yaml").read_text()
    assert re.findall(r"round[1-9]\d*", text) == []
    stages = yaml.safe_load(text)["stages"]
    per_round = {name for name, stage in stages.items() if stage.get("foreach") == "${rounds}"}
    assert {"train", "realign", "evaluate", "analyze"} <= per_round


@pytest.mark.slow
@pytest.mark.parametrize("n_rounds", [2, 4])
def test_the_number_of_rounds_is_set_in_params_alone(tmp_path, monkeypatch, n_rounds: int) -> None:
    """A tiny study of 2 or 4 rounds runs end to end after editing params.yaml only."""
    rounds = ", ".join(f"round{k}: round{k - 1}" for k in range(1, n_rounds + 1))
    study = TINY_STUDY_PARAMS.replace("round_factors: {round3: [2]}", "round_factors: {}")  # every round: factors
    study = re.sub(r"rounds: \{.*\}", f"rounds: {{{rounds}}}", study)
    params = (
        "cities:\n  minitown: {source: synthetic, style: dense, tiles: [1]}\n"
        "synthetic: {size: 256, seed: 0}\n"
        "draw: {tile: minitown1, window: [0, 0, 256, 256]}\n" + study
    )
    proj, dvc = make_dvc_project(tmp_path, params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dvc("repro")
    names = [f"round{k}" for k in range(n_rounds + 1)]
    assert sorted(p.stem for p in (proj / "data" / "metrics").iterdir()) == names
    assert sorted(p.name for p in (proj / "data" / "labels").iterdir()) == names
    changes = json.loads((proj / "data" / "changes" / "metrics.json").read_text())
    assert list(changes) == [f"{a}_to_{b}" for a, b in zip(names, names[1:])]
    compare = json.loads((proj / "data" / "compare" / "metrics.json").read_text())
    assert sorted(compare) == sorted([*names[1:], "changes"])


def _module_file(src: Path, name: str) -> Path | None:
    path = src / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _package_imports(src: Path, module: str) -> set[Path]:
    """Files of the cadalign modules ``module`` imports, directly or not (function-level imports too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(_module_file(src, name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for full in names:
                parts = full.split(".")
                todo += [".".join(parts[:i]) for i in range(2, len(parts) + 1) if parts[0] == "cadalign"
                         and _module_file(src, ".".join(parts[:i]))]
    return {_module_file(src, name).relative_to(src.parent) for name in seen}


@pytest.mark.parametrize(
    ("pipeline", "some_stages"),
    [("dvc.yaml", {"fetch", "misalign", "train", "realign", "analyze"}), ("pipelines/toy/dvc.yaml", {"estimate_density"})],
)
def test_stage_deps_are_the_package_code_it_imports(pipeline: str, some_stages: set[str]) -> None:
    """Each stage's src/ deps are exactly the files of the cadalign modules it imports, one by one
    (no folders), so touching a module reruns the stages that use it and only those."""
    repo = Path(__file__).resolve().parents[1]
    dvc_file = repo / pipeline
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    assert some_stages <= set(stages)
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split("python -m ")[1].split()[0]
        files = {f for f in _package_imports(repo / "src", module) if (repo / f).read_text().strip()}  # not empty __init__s
        paths = [(dvc_file.parent / d).resolve().relative_to(repo) for d in body["deps"]]
        deps = [d for d in paths if d.parts[0] == "src"]
        folders = [str(d) for d in deps if (repo / d).is_dir()]
        assert not folders, f"{pipeline}: {name}: name the files of {folders}, not the folders"
        missing, unused = sorted(map(str, files - set(deps))), sorted(map(str, set(deps) - files))
        assert not missing, f"{pipeline}: {name}: add {missing} to its deps"
        assert not unused, f"{pipeline}: {name}: {unused} in its deps, but the stage does not import them"


def test_stages_with_a_threads_option_pin_it() -> None:
    """torch sums over threads in another order per count (a network's output on 1, 2 and 4
    threads differs in its last bits), so every stage that takes --threads runs with one."""
    repo = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    taking = set()
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        module = cmd.split("python -m ")[1].split()[0]
        if "add_threads_option(parser)" in (repo / "src" / (module.replace(".", "/") + ".py")).read_text():
            taking.add(name)
            assert re.search(r"--threads \d+", cmd), f"dvc.yaml: {name}: add --threads <n> to its cmd"
    assert {"train", "realign", "analyze"} <= taking


def test_no_stage_imports_another() -> None:
    """Stages share settings through cadalign.settings, never through each other (common is plumbing)."""
    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "src" / "cadalign" / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            others = {n for n in names if n.startswith("cadalign.stages.") and n.split(".")[2] not in ("common",)}
            others = {n for n in others if (repo / "src" / Path(*n.split("."))).with_suffix(".py").is_file()}
            assert not others, f"{path.name} imports {sorted(others)}; move what they share to cadalign.settings"
