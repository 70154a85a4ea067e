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
