"""DVC stage: the seeded, untrained networks that round 1 starts from ("round 0's networks").

With ``train.warm_start`` each round's networks start from the previous round's; this stage
gives round 1 its starting point the same way, so every train stage reads ``--init``. The
weights are the seeded random initialisation (seed ``train.optim.seed + ds``, as a network
of round 0 would get), written as ``--out/ds<f>.pt`` for each factor round 1 trains
(``train.round_factors.round1`` or ``train.factors``; with ``train.grow`` the coarsest only:
round 1's finer networks start from the coarser ones). "Round 1" is every round of
``rounds`` that trains on labels no round writes (round1: round0).

Usage::

    python -m cadalign.stages.initialize --params params.yaml --out data/models/round0
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cadalign.atomic import atomic_path
from cadalign.config import ConfigError, load_section, read_params
from cadalign.model import AlignNet
from cadalign.provenance import write_manifest
from cadalign.stages.common import make_parser, setup_logging
from cadalign.settings.train import TrainStageConfig, check_round_names, network_seed
from cadalign.train import save_model

logger = logging.getLogger(__name__)


def initial_factors(params: Path, cfg: TrainStageConfig) -> list[int]:
    """The factors whose networks the first rounds start from, coarse to fine.

    The first rounds are those of ``rounds`` whose labels no round writes (all of ``factors``
    without a ``rounds`` mapping). With ``train.grow`` a first round needs only its coarsest
    network; two first rounds where one's coarsest is a finer factor of the other are refused,
    since that network would start the other round's finer network instead of growing it.
    """
    rounds = read_params(params).get("rounds")
    names = [r for r, labels in rounds.items() if labels not in rounds] if isinstance(rounds, dict) else []
    sets = {name: cfg.factors_of(name) for name in names} or {"": tuple(sorted(cfg.factors, reverse=True))}
    if not cfg.grow:
        return sorted(set().union(*sets.values()), reverse=True)
    for name, factors in sets.items():
        for other, other_factors in sets.items():
            if factors[0] in other_factors[1:]:
                raise ConfigError(
                    f"{params}: rounds {name} and {other} both start from the initial networks, and with train.grow "
                    f"{name}'s ds-{factors[0]} network would start {other}'s ds-{factors[0]} network instead of it "
                    f"growing from ds {other_factors[0]}; give both the same coarsest factor in train.round_factors"
                )
    return sorted({factors[0] for factors in sets.values()}, reverse=True)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Write the seeded untrained networks that round 1 starts from.")
    parser.add_argument("--out", type=Path, required=True, help="folder of the networks (ds<f>.pt)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_section(args.params, "train", TrainStageConfig)
    check_round_names(args.params, cfg)
    factors = initial_factors(args.params, cfg)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for ds in factors:
            torch.manual_seed(network_seed(cfg, 0, ds))
            save_model(AlignNet(cfg.model), tmp / f"ds{ds}.pt")
            logger.info("initial network ds=%d in %s", ds, args.out)
        write_manifest(tmp, args.params, "initialize", "round0")


if __name__ == "__main__":
    main()
