"""The rounds of the study (``rounds:`` in params.yaml, round -> the labels it trains on).

Every per-round stage (through DVC's foreach) and every aggregate stage (contrast, draw,
compare, summarize, through :func:`read_rounds`) takes its list from there alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cadalign.config import ConfigError, check_name, read_params

ROUNDS_EXAMPLE = "rounds: {round1: round0, round2: round1, round3: round2}"


def read_rounds(params: str | Path) -> dict[str, str]:
    """The ``rounds`` mapping of params.yaml (round -> the label set it trains on), checked.

    Raises:
        ConfigError: naming the file, when the mapping is missing or empty, a name is not a
            valid folder name, or a round trains on its own labels or on a round that comes
            after it (the rounds must form a chain or a tree from the input labels).
    """
    rounds = read_params(params).get("rounds")
    if not isinstance(rounds, Mapping) or not rounds:
        raise ConfigError(f"{params}: 'rounds' must be a non-empty mapping round -> labels, e.g. {ROUNDS_EXAMPLE}")
    out: dict[str, str] = {}
    for name, source in rounds.items():
        check_name(str(name), "round name (rounds)")
        check_name(str(source), f"label set of rounds.{name}")
        out[str(name)] = str(source)
    label_order(out, where=str(params))  # refuses cycles, naming the file
    return out


def label_order(rounds: Mapping[str, str], where: str = "params.yaml") -> list[str]:
    """Every label set of the study in the order it is made: the input labels no round writes
    (e.g. ``round0``), then each round after the round whose labels it trains on.

    Raises:
        ConfigError: if a round trains on its own labels, or the rounds form a cycle.
    """
    order = [source for source in dict.fromkeys(rounds.values()) if source not in rounds]
    pending = dict(rounds)
    while pending:
        ready = [name for name, source in pending.items() if source in order]
        if not ready:
            names = ", ".join(f"{k}: {v}" for k, v in pending.items())
            raise ConfigError(
                f"{where}: rounds {{{names}}} train on labels that no earlier round writes (a cycle); "
                f"each round must train on the input labels or on an earlier round, e.g. {ROUNDS_EXAMPLE}"
            )
        for name in ready:
            order.append(name)
            del pending[name]
    return order


def label_sets(params: str | Path) -> tuple[dict[str, str], list[str]]:
    """The checked ``rounds`` mapping of params.yaml and every label set in the order it is made
    (see :func:`label_order`), read once for the aggregate stages.

    Raises:
        ConfigError: as :func:`read_rounds`.
    """
    rounds = read_rounds(params)
    return rounds, label_order(rounds)
