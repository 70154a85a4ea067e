"""Stale inputs cannot feed a stage (issue 26 item 2): the manifests of cadalign.provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from studies import run_realign, run_train

from cadalign.provenance import MANIFEST, STAGE_PARAMS, StaleInputError, check_input, write_manifest
from cadalign.stages import evaluate, train

ROOT = Path(__file__).resolve().parents[1]

PARAMS = """
cities:
  tinytown: {source: synthetic, tiles: [1, 2]}
synthetic: {seed: 0}
noise: {max_displacement: 3.0, seed: 4}
realign: {refine: 1}
"""


def test_stage_params_are_those_dvc_yaml_lists() -> None:
    """A recorded key DVC does not track would be refused while `dvc repro` reruns nothing;
    one it tracks but the manifest omits would let a stale input through."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, keys in STAGE_PARAMS.items():
        body = stages[stage].get("do", stages[stage])
        listed = tuple(key.replace("${key}", "{city}").replace("${item.source}", "{source}") for key in body["params"])
        assert listed == keys, stage


def test_a_manifest_records_the_stage_keys_the_city_keys_and_its_inputs(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    write_manifest(tmp_path / "round0" / "tinytown", params, "misalign", "round0", city="tinytown")
    recorded = check_input(params, tmp_path / "round0", "labels", ["tinytown"])
    assert recorded == {"cities.tinytown": {"source": "synthetic", "tiles": [1, 2]}, "noise": {"max_displacement": 3.0, "seed": 4},
                        "synthetic": {"seed": 0}}
    write_manifest(tmp_path / "round1", params, "realign", "round1", [recorded], cities=["tinytown"])
    manifest = json.loads((tmp_path / "round1" / MANIFEST).read_text())
    # `cities` covers `cities.tinytown`; the fetch stage's section and the input's keys come along
    assert manifest == {"stage": "realign", "name": "round1", "params": {
        "cities": {"tinytown": {"source": "synthetic", "tiles": [1, 2]}}, "noise": {"max_displacement": 3.0, "seed": 4},
        "realign": {"refine": 1}, "synthetic": {"seed": 0}}}


def test_each_changed_key_is_named_with_both_values(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    write_manifest(tmp_path / "round1", params, "realign", "round1", cities=["tinytown"])
    params.write_text(PARAMS.replace("refine: 1", "refine: 2").replace("tiles: [1, 2]", "tiles: [1]"))
    with pytest.raises(StaleInputError) as err:
        check_input(params, tmp_path / "round1", "labels")
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'round1' / MANIFEST}: the labels in {tmp_path / 'round1'} belong to another study")
    assert "cities.tinytown.tiles was [1, 2], is [1]" in text and "realign.refine was 1, is 2" in text
    assert "Run `dvc repro`" in text


def test_an_input_without_a_manifest_is_not_checked(tmp_path: Path) -> None:
    (tmp_path / "mine" / "tinytown").mkdir(parents=True)
    # no params file either: nothing is read when there is nothing to compare
    assert check_input(tmp_path / "absent.yaml", tmp_path / "mine", "labels", ["tinytown"]) == {}


def test_a_garbled_manifest_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "round1").mkdir()
    (tmp_path / "round1" / MANIFEST).write_text("{not json")
    with pytest.raises(StaleInputError, match=re.escape(f"{tmp_path / 'round1' / MANIFEST}: unreadable manifest")):
        check_input(tmp_path / "params.yaml", tmp_path / "round1", "labels")


def stale_round_study(train_study: dict[str, Path]) -> dict[str, Path]:
    """The issue's case on the tiny study: rounds 1 and 2 run, then `noise.seed` changed and
    round 1 removed from `rounds` while round 2 still trains on its labels."""
    p = train_study
    params = p["params"]
    params.write_text(params.read_text() + "rounds: {round1: round0, round2: round1}\n")
    run_train(p)
    run_realign(p)  # labels/round1, made under noise.seed 4
    params.write_text(params.read_text().replace("seed: 4}", "seed: 5}").replace("round1: round0, ", ""))
    return p


def test_a_round_removed_from_the_study_cannot_feed_the_next(train_study: dict[str, Path], one_thread: None) -> None:
    p = stale_round_study(train_study)
    manifest = p["round1"] / MANIFEST
    with pytest.raises(StaleInputError) as err:
        train.main(
            ["--params", str(p["params"]), "--round", "round2", "--cities-dir", str(p["cities"]),
             "--labels", str(p["round1"]), "--out", str(p["models"].with_name("round2")),
             "--checkpoints", str(p["ckpt"].with_name("round2")), "--log", str(p["log"].with_name("round2.csv"))]
        )
    text = str(err.value)
    assert text.startswith(f"{manifest}: the labels in {p['round1']} belong to another study")
    assert "noise.seed was 4, is 5" in text and 'rounds.round1 was "round0", is absent' in text
    assert "round1 is no longer a round of `rounds`" in text and "`dvc repro`" in text
    assert not p["models"].with_name("round2").exists()


def test_evaluate_refuses_labels_of_another_study(train_study: dict[str, Path], one_thread: None) -> None:
    p = stale_round_study(train_study)
    out = p["round1"].parent.parent / "eval" / "round1"
    with pytest.raises(StaleInputError, match=re.escape(f"{p['round1'] / MANIFEST}: the labels in {p['round1']}")):
        evaluate.main(
            ["--params", str(p["params"]), "--name", "round1", "--cities-dir", str(p["cities"]), "--truth", str(p["truth"]),
             "--labels", str(p["round1"]), "--metrics", str(out / "metrics.json"), "--curve", str(out / "accuracy.csv"),
             "--errors", str(out / "errors.csv")]
        )
    assert not out.exists()
