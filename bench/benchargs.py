"""Command-line options the benchmark scripts share: ``--tiny`` (a seconds-long run, for CI and
``bench/gpu_check.sh``) and ``--json`` (the figures also written as JSON)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def add_tiny_and_json(parser: argparse.ArgumentParser, tiny: Mapping[str, Any], what: str) -> None:
    """Add ``--tiny`` (sets the options in ``tiny``) and ``--json PATH``."""
    parser.add_argument("--tiny", action="store_true", help=f"{what}: {dict(tiny)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")


def parse_args(parser: argparse.ArgumentParser, tiny: Mapping[str, Any]) -> argparse.Namespace:
    """Parse the command line; with ``--tiny`` the options of ``tiny`` replace those given."""
    args = parser.parse_args()
    if args.tiny:
        for key, value in tiny.items():
            setattr(args, key, value)
    return args
