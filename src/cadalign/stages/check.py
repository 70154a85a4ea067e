"""DVC stage: the cities' sources checked before any fetch stage (the first stage of dvc.yaml).

DVC reads each fetch stage's params (``${item.source}``: the section of the city's source)
before it runs any of its code, so a city whose source is unknown (``source: osm``) or has no
section in params.yaml stopped ``dvc repro`` with DVC's bare "Parameters 'osm' are missing
from 'params.yaml'". ``dvc repro`` runs this stage first (it is declared first and tracks
``cities``): it names the city, the key and the sources there are. It writes nothing.
``dvc repro fetch@<city>`` alone skips it and shows DVC's message.

Usage::

    python -m cadalign.stages.check --params params.yaml
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cadalign.config import SOURCES, ConfigError, load_cities, read_params
from cadalign.stages.common import make_parser, setup_logging


def check_sources(params: str | Path) -> None:
    """Refuse a city whose source is unknown or whose source's section is missing.

    Raises:
        ConfigError: naming the file, the city's ``source`` key and the fix.
    """
    data = read_params(params)
    cities = data.get("cities")
    for name, entry in (cities.items() if isinstance(cities, Mapping) else ()):
        source = entry.get("source") if isinstance(entry, Mapping) else None
        if source not in SOURCES:
            raise ConfigError(
                f"{params}: cities.{name}.source = {source!r} is not a source; use one of {', '.join(SOURCES)} "
                "(docs/real-data.md)"
            )
        if source not in data:
            raise ConfigError(
                f"{params}: cities.{name}.source is {source} but params.yaml has no '{source}' section, which "
                f"the fetch stage of {name} reads; add it (conf/preset/cpu.yaml has one)"
            )
    load_cities(params)  # every entry's keys and values


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Check the cities' sources before the fetch stages run.")
    args = parser.parse_args(argv)
    setup_logging()
    check_sources(args.params)


if __name__ == "__main__":
    main()
