"""Shared command-line plumbing of the stage modules (argument parser, logging)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def make_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage takes (``--params``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="path of params.yaml (default: %(default)s)")
    return parser


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's intra-op CPU threads. A sum split over threads is added in
    another order, so on the CPU a network's outputs and gradients depend on the count:
    dvc.yaml pins it, and the same count (and CPU kind) gives the same bytes."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op CPU threads (default: torch's choice, one per core; the results depend on it)",
    )


def set_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Apply ``--threads`` (see :func:`add_threads_option`), refusing a count below 1."""
    if args.threads is None:
        return
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def name_path_pairs(values: list[str], option: str) -> dict[str, Path]:
    """``NAME=PATH`` arguments as {name: path}, in the order given.

    Raises:
        ValueError: naming the option, for a value without ``=``, a name or a path.
    """
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{option} {value!r}: expected NAME=PATH")
        out[name] = Path(path)
    return out


def setup_logging() -> None:
    """Log to stderr at INFO (``CADALIGN_LOG_LEVEL`` overrides); quiet the chattiest libraries.

    Leaves an already configured root logger alone (e.g. pytest's capture).
    """
    logging.basicConfig(
        level=os.environ.get("CADALIGN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("alembic", "mlflow", "urllib3", "rasterio", "fiona", "pyogrio", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_device(name: str, what: str) -> torch.device:
    """The torch device for ``auto``/``cpu``/``cuda``: CUDA when present, else the CPU.

    Args:
        name: ``"auto"``, ``"cuda"`` or ``"cpu"`` (a ``device`` param).
        what: the params key, named in the warning when CUDA is asked for but absent.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if name != "cpu":
        logger.warning("%s = %s but CUDA is not available; running on the CPU", what, name)
    return torch.device("cpu")
