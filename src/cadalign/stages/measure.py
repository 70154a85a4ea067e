"""DVC stage: measure a polygon layer of the cities against their building masks.

For every city that has ``<cities-dir>/<city>/<layer>/<tile>.gpkg`` (``osm`` for the
OpenStreetMap buildings of Inria cities; ``polygons`` for the true polygons, the metric's
own floor), each polygon's residual misalignment is the length of the translation within
``+-max_shift`` px that best overlaps the tile's gt mask (:mod:`cadalign.geo.mask_metric`).
Writes the summary (median, mean, fractions within 1/2/4/8 px, per city) as a DVC metric.
Cities without the layer (synthetic cities have no ``osm``) are listed under
``cities_without_layer``.

Usage::

    python -m cadalign.stages.measure --cities-dir data/cities --layer osm \
        --metrics data/eval/osm/metrics.json
"""

from __future__ import annotations

import logging
from pathlib import Path

from cadalign.atomic import write_json
from cadalign.config import check_name, load_cities
from cadalign.geo.mask_metric import layer_offsets, summarize_by_city
from cadalign.stages.common import make_parser, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)


def measure_layer(cities_dir: Path, layer: str, max_shift: int = 32, cities: list[str] | None = None) -> dict:
    """Mask-metric summary of one layer over all cities that carry it.

    Args:
        cities_dir: folder of the cities.
        layer: sub-folder of each city holding the polygons (``osm``, ``polygons``).
        max_shift: search range in pixels.
        cities: the cities of the study (None: every city folder).

    Returns:
        The summary of :func:`cadalign.geo.mask_metric.summarize_by_city` (or only
        ``n_polygons: 0`` and empty ``cities`` when no city has the layer), plus
        ``cities_without_layer`` and ``max_shift_px``.

    Raises:
        FileNotFoundError: ``cities_dir`` is missing, or a tile of the layer has no gt mask.
        ValueError: ``layer`` is not a plain folder name, or the layer's polygons cover no
            pixel at all.
    """
    check_name(layer, "layer name")
    offsets = layer_offsets(cities_dir, layer, max_shift, cities)
    if offsets:
        metrics = summarize_by_city(offsets)
    else:
        logger.warning("no city under %s has a %s/ folder; nothing to measure", cities_dir, layer)
        metrics = {"n_polygons": 0, "cities": {}}
    metrics["cities_without_layer"] = sorted(
        p.name
        for p in Path(cities_dir).iterdir()
        if p.is_dir() and p.name not in offsets and (cities is None or p.name in cities)
    )
    metrics["max_shift_px"] = max_shift
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = make_parser("Measure a polygon layer of the cities against their gt masks (best translation).")
    parser.add_argument("--cities-dir", type=Path, required=True)
    parser.add_argument(
        "--layer", default="osm", help="sub-folder of each city to measure (default: %(default)s)"
    )
    parser.add_argument("--max-shift", type=int, default=32, help="search range in px (default: %(default)s)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    setup_logging()
    if args.max_shift < 0:
        parser.error(f"--max-shift {args.max_shift}: must be >= 0")
    with stage_run(f"measure@{args.layer}", {"layer": args.layer, "max_shift": args.max_shift}) as run:
        metrics = measure_layer(args.cities_dir, args.layer, args.max_shift, sorted(load_cities(args.params)))
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
    if metrics["n_polygons"]:
        logger.info(
            "%s: median offset %.2f px over %d polygons",
            args.layer,
            metrics["median_offset_px"],
            metrics["n_polygons"],
        )


if __name__ == "__main__":
    main()
