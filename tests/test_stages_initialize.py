"""The initialize stage: the seeded networks that round 1 starts from."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import max_weight_diff

from cadalign.config import load_section
from cadalign.model import AlignNet
from cadalign.stages import initialize
from cadalign.stages.train import TrainStageConfig, network_seed
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
    assert sorted(p.name for p in out.iterdir()) == ["ds2.pt", "ds4.pt"]
    cfg = load_section(params, "train", TrainStageConfig)
    for ds in (2, 4):
        written = load_model(out / f"ds{ds}.pt")
        assert network_seed(cfg, 0, ds) == 7 + ds
        torch.manual_seed(7 + ds)  # the seed a round-0 network of this factor gets
        assert max_weight_diff(written, AlignNet(cfg.model)) == 0.0
    assert max_weight_diff(load_model(out / "ds2.pt"), load_model(out / "ds4.pt")) > 0.0
    initialize.main(["--params", str(params), "--out", str(out)])  # a rerun replaces the folder
    assert sorted(p.name for p in out.iterdir()) == ["ds2.pt", "ds4.pt"]


def test_initialize_with_grow_writes_the_coarsest_only(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS + "  grow: true\n")
    out = tmp_path / "round0"
    initialize.main(["--params", str(params), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["ds4.pt"]
