"""The ``realign`` section of params.yaml: read by the realign stage, and by the train stage
for ``train.cascade`` (each finer network trains on the labels its coarser networks realign)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cadalign.align import AlignConfig


@dataclass(frozen=True)
class RealignStageConfig:
    """The ``realign`` section of params.yaml."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    window: AlignConfig = field(default_factory=AlignConfig)
    refine: int = 0  # extra passes of the finest network after the coarse-to-fine chain

    def validate(self) -> None:
        """Check ranges.

        Raises:
            ValueError: naming the key.
        """
        if self.refine < 0:
            raise ValueError(f"refine={self.refine} must be >= 0 (0: the chain alone)")
