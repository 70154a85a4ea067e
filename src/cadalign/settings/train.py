"""The ``train`` section of params.yaml, and what the stages that read it must agree on.

Read by the initialize stage (the seeded networks round 1 starts from), the train stage and the
analyze stage (which network of a round is analysed), and by the presets check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cadalign.config import ConfigError, read_params
from cadalign.model import AlignNet, LossConfig, ModelConfig
from cadalign.patches import PatchConfig
from cadalign.train import TrainConfig


@dataclass(frozen=True)
class TrainStageConfig:
    """The ``train`` section of params.yaml."""

    # One network per downsampling factor, applied coarse to fine at realignment; the chain
    # corrects up to about disp_max_px x sum(factors) px (reference 8, 4, 2, 1: ~60 px).
    factors: tuple[int, ...] = (8, 4, 2, 1)
    # Side of the network input (px); the output side follows from the model (valid
    # convolutions; reference 220 -> 100). Must be a valid size for the model's depth.
    input_size: int = 220
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: TrainConfig = field(default_factory=TrainConfig)
    # Patch settings shared by all factors (ds, the sizes and the target scale are set per net).
    # Here ``patches.field_extent`` is in FULL-resolution px (divided by ds per network), so
    # the training noise can be as smooth as the label noise (one field per tile side).
    patches: PatchConfig = field(default_factory=PatchConfig)
    # Start each round's networks from the previous round's (round 1 from the seeded
    # initialisation of the initialize stage) instead of afresh as the reference did: round
    # k then fine-tunes on the better labels, which lets a short CPU run keep learning.
    warm_start: bool = False
    # Train each finer network on the labels as the round's coarser networks (just trained)
    # realign them, with the ``realign.window`` settings: the residual misalignment it will
    # meet in the chain at realignment, instead of the whole label noise (against which a
    # fine network's small training field teaches it to move almost nothing). The reference
    # trained every factor on the same labels.
    cascade: bool = False
    # A finer network with no network of its own factor to start from (train.warm_start
    # false, or --init lacks it: with grow the initialize stage writes only the coarsest)
    # starts from the next coarser network the round just trained. A ds-1 network does not
    # learn from scratch in a short CPU run; started from the ds-2 network it does.
    grow: bool = False
    # Factors of named rounds in place of ``factors`` (e.g. {round2: [2, 1]}): once the labels
    # are good, a coarse network's own error is larger than what is left for it to correct.
    # With train.warm_start each must be among the previous round's networks (or grown).
    round_factors: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def validate(self) -> None:
        default = PatchConfig()
        if (self.patches.input_size, self.patches.output_size) != (default.input_size, default.output_size):
            raise ValueError("patches.input_size/output_size are derived; set train.input_size instead")
        for key, factors in [("factors", self.factors)] + [(f"round_factors.{r}", f) for r, f in self.round_factors.items()]:
            if not factors or min(factors) < 1 or len(set(factors)) != len(factors):
                raise ValueError(f"{key} = {list(factors)}; list distinct downsampling factors >= 1, e.g. [4, 2, 1]")

    def factors_of(self, round_name: str) -> tuple[int, ...]:
        """The factors round ``round_name`` trains (and so realigns with), coarse to fine."""
        return tuple(sorted(self.round_factors.get(round_name, self.factors), reverse=True))

    @property
    def shared_factors(self) -> tuple[int, ...]:
        """The factors every round trains, coarse to fine (those whose networks can be compared)."""
        shared = set(self.factors).intersection(*self.round_factors.values())
        return tuple(sorted(shared, reverse=True))


def patch_config(cfg: TrainStageConfig, ds: int, seed: int) -> PatchConfig:
    """The patch settings of the network of factor ``ds`` (sizes from the model, target scale from its tanh range)."""
    net = AlignNet(cfg.model)
    try:
        out = net.output_size(cfg.input_size)
    except ValueError as err:
        raise ValueError(f"train.input_size = {cfg.input_size}: {err}") from err
    extent = cfg.patches.field_extent
    return dataclasses.replace(
        cfg.patches,
        ds=ds,
        field_extent=None if extent is None else extent / ds,
        input_size=net.input_size(out),
        output_size=out,
        max_displacement=cfg.model.disp_max_px,
        seed=seed,
    )


def network_seed(cfg: TrainStageConfig, round_index: int, ds: int) -> int:
    """Seed of the network of factor ``ds`` in round ``round_index`` (its init and its patches)."""
    return cfg.optim.seed + 1000 * round_index + ds


def check_round_names(params: Path, cfg: TrainStageConfig) -> None:
    """Refuse ``train.round_factors`` keys that name no round of ``rounds`` (a typo would train ``factors``)."""
    if not cfg.round_factors:
        return
    rounds = read_params(params).get("rounds")
    if not isinstance(rounds, dict) or not rounds:
        raise ConfigError(
            f"{params}: train.round_factors names rounds but there is no 'rounds' mapping; add one, "
            "e.g. rounds: {round1: round0, round2: round1, round3: round2}"
        )
    for name in cfg.round_factors:
        if name not in rounds:
            raise ConfigError(
                f"{params}: train.round_factors.{name} names no round of 'rounds' ({', '.join(map(str, rounds))}); "
                "rename the key to one of them"
            )
