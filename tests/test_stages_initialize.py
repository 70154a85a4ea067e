"""The initialize stage: the seeded networks that round 1 starts from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import max_weight_diff

from cadalign.config import ConfigError, load_section
from cadalign.model import AlignNet
from cadalign.stages import initialize
from cadalign.settings.train import TrainStageConfig, network_seed
from cadalign.train import load_model

PARAMS = """
train:
  factors: [4, 2]
  input_size: 40
  model: {image_widths: [4, 8], poly_widths: [2, 4], deep_supervision_levels: 1}
  optim: {seed: 7}
"""


def test_initialize_writes_the_seeded_networks(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    out = tmp_path / "models" / "round0"
    initialize.main(["--params", str(params), "--out", str(out)])
    assert sorted(p.name for p in out.glob("ds*.pt")) == ["ds2.pt", "ds4.pt"]
    cfg = load_section(params, "train", TrainStageConfig)
    for ds in (2, 4):
        written = load_model(out / f"ds{ds}.pt")
        assert network_seed(cfg, 0, ds) == 7 + ds
        torch.manual_seed(7 + ds)  # the seed a round-0 network of this factor gets
        assert max_weight_diff(written, AlignNet(cfg.model)) == 0.0
    assert max_weight_diff(load_model(out / "ds2.pt"), load_model(out / "ds4.pt")) > 0.0
    initialize.main(["--params", str(params), "--out", str(out)])  # a rerun replaces the folder
    assert sorted(p.name for p in out.glob("ds*.pt")) == ["ds2.pt", "ds4.pt"]


def test_initialize_with_grow_writes_the_coarsest_only(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS + "  grow: true\n")
    out = tmp_path / "round0"
    initialize.main(["--params", str(params), "--out", str(out)])
    assert sorted(p.name for p in out.glob("ds*.pt")) == ["ds4.pt"]


@pytest.mark.parametrize(("grow", "written"), [(True, ["ds8.pt"]), (False, ["ds2.pt", "ds4.pt", "ds8.pt"])])
def test_initialize_writes_the_factors_of_the_first_round(tmp_path: Path, grow: bool, written: list[str]) -> None:
    params = tmp_path / "params.yaml"
    text = PARAMS + f"  grow: {str(grow).lower()}\n  round_factors: {{round1: [8, 4, 2], round2: [1]}}\n"
    params.write_text(text + "rounds: {round1: round0, round2: round1}\n")
    out = tmp_path / "round0"
    initialize.main(["--params", str(params), "--out", str(out)])
    assert sorted(p.name for p in out.glob("ds*.pt")) == written  # round1's factors; round2 does not start from them
    params.write_text(text.replace("round1: [8", "Round1: [8") + "rounds: {round1: round0, round2: round1}\n")
    with pytest.raises(ConfigError, match=r"train.round_factors.Round1 names no round of 'rounds'"):
        initialize.main(["--params", str(params), "--out", str(out)])


def test_initialize_refuses_first_rounds_that_cannot_share_with_grow(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        PARAMS + "  grow: true\n  round_factors: {a: [2, 1], b: [4, 2]}\nrounds: {a: round0, b: round0}\n"
    )
    out = tmp_path / "round0"
    with pytest.raises(ConfigError, match=r"rounds a and b both start from the initial networks.*same coarsest factor"):
        initialize.main(["--params", str(params), "--out", str(out)])
    assert not out.exists()
    params.write_text(PARAMS + "  grow: true\n  round_factors: {a: [4, 1], b: [4, 2]}\nrounds: {a: round0, b: round0}\n")
    initialize.main(["--params", str(params), "--out", str(out)])
    assert sorted(p.name for p in out.glob("ds*.pt")) == ["ds4.pt"]
