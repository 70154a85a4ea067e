"""DVC stage: the seeded, untrained networks that round 1 starts from ("round 0's networks").

With ``train.warm_start`` each round's networks start from the previous round's; this stage
gives round 1 its starting point the same way, so every train stage reads ``--init``. The
weights are the seeded random initialisation (seed ``train.optim.seed + ds``, as a network
of round 0 would get), written as ``--out/ds<f>.pt`` for each of ``train.factors`` (with
``train.grow`` for the coarsest only: round 1's finer networks start from the coarser ones).

Usage::

    python -m cadalign.stages.initialize --params params.yaml --out data/models/round0
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cadalign.atomic import atomic_path
from cadalign.config import load_section
from cadalign.model import AlignNet
from cadalign.stages.common import make_parser, setup_logging
from cadalign.stages.train import TrainStageConfig, network_seed
from cadalign.train import save_model

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Write the seeded untrained networks that round 1 starts from.")
    parser.add_argument("--out", type=Path, required=True, help="folder of the networks (ds<f>.pt)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_section(args.params, "train", TrainStageConfig)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for ds in [max(cfg.factors)] if cfg.grow else cfg.factors:
            torch.manual_seed(network_seed(cfg, 0, ds))
            save_model(AlignNet(cfg.model), tmp / f"ds{ds}.pt")
            logger.info("initial network ds=%d in %s", ds, args.out)


if __name__ == "__main__":
    main()
