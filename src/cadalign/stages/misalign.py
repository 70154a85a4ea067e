"""DVC stage: misalign a city's true polygons with smooth random displacement fields.

For every tile of the city it writes, in the tile's own CRS:

- ``--truth-out/<tile>.gpkg``: the true polygons, repaired and clipped to the tile (the
  reference every round is scored against);
- ``--labels-out/<tile>.gpkg``: the noisy labels (round 0), same ids and vertex order;
- ``--fields-out/<tile>.tif``: the displacement field (float32, bands dx, dy in pixels; with
  ``noise.renoise_displacement > 0`` two more bands hold the second field).

Usage::

    python -m cadalign.stages.misalign --params params.yaml --city synthville \
        --city-dir data/cities/synthville --truth-out data/truth/synthville \
        --labels-out data/labels/round0/synthville --fields-out data/noise/synthville
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadalign import noise
from cadalign.atomic import atomic_path
from cadalign.config import load_city, load_section
from cadalign.geo.polygons import (
    check_finite,
    check_some_inside,
    clean_polygons,
    from_pixels,
    read_polygons,
    to_pixels,
    write_polygons,
)
from cadalign.geo.tiles import read_info, write_geotiff
from cadalign.provenance import write_manifest
from cadalign.stages.common import make_parser, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseConfig:
    """The ``noise`` section of params.yaml."""

    max_displacement: float = 16.0  # px, largest |dx| and |dy| (the reference tested up to 32)
    n_bumps: int = 30  # Gaussian bumps per component, as in the reference
    coarse_factor: int = 4  # bumps evaluated at 1/4 resolution, then bilinear upsampling
    seed: int = 1
    # Ablation "re-noised labels" (as in the paper): a second, independent field of this
    # amplitude (px) moves the noisy labels once more. 0 disables it.
    renoise_displacement: float = 0.0

    def validate(self) -> None:
        if not self.max_displacement >= 0:
            raise ValueError(
                f"max_displacement = {self.max_displacement} is negative; set noise.max_displacement >= 0 (px)"
            )
        if not self.renoise_displacement >= 0:
            raise ValueError(
                f"renoise_displacement = {self.renoise_displacement}; set noise.renoise_displacement >= 0 (0 disables it)"
            )
        if self.n_bumps < 1:
            raise ValueError(f"n_bumps = {self.n_bumps}; set noise.n_bumps >= 1")
        if self.coarse_factor < 1:
            raise ValueError(f"coarse_factor = {self.coarse_factor}; set noise.coarse_factor >= 1")


def tile_rng(seed: int, city: str, number: int) -> np.random.Generator:
    """A generator that depends only on (seed, city, tile number), stable across runs."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(city.encode()), number]))


def misalign_city(
    city: str,
    tiles: tuple[int, ...],
    city_dir: Path,
    cfg: NoiseConfig,
    truth_out: Path,
    labels_out: Path,
    fields_out: Path,
    params: Path | None = None,
) -> dict[str, float]:
    """Misalign every tile of a city; returns counts and the mean field amplitude.

    ``params``: params.yaml, whose keys the labels' manifest records (:mod:`cadalign.provenance`).
    """
    totals: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        truth_tmp, labels_tmp, fields_tmp = (stack.enter_context(atomic_path(p)) for p in (truth_out, labels_out, fields_out))
        for d in (truth_tmp, labels_tmp, fields_tmp):
            d.mkdir()
        for number in tiles:
            name = f"{city}{number}"
            info = read_info(city_dir / "images" / f"{name}.tif")
            source = city_dir / "polygons" / f"{name}.gpkg"
            gdf = read_polygons(source)
            geoms, ids = to_pixels(gdf, info.transform, info.crs, where=str(source))
            geoms, ids, stats = clean_polygons(geoms, ids, info.shape, where=str(source))
            check_some_inside(stats, str(source), gdf.crs, info.crs)
            if len(geoms) == 0:
                logger.warning("%s: no building inside the tile; it contributes no vertices", name)
            field = noise.random_displacement_field(
                info.shape, cfg.max_displacement, cfg.n_bumps, tile_rng(cfg.seed, city, number), cfg.coarse_factor
            )
            noisy = noise.misalign(geoms, field)
            bands = ("dx_px", "dy_px")
            if cfg.renoise_displacement > 0:
                extra = noise.random_displacement_field(
                    info.shape, cfg.renoise_displacement, cfg.n_bumps,
                    tile_rng(cfg.seed + 1, city, number), cfg.coarse_factor,
                )
                noisy = noise.misalign(noisy, extra)
                field, bands = np.concatenate([field, extra]), bands + ("renoise_dx_px", "renoise_dy_px")
            check_finite(noisy, ids, str(labels_out / f"{name}.gpkg"), "the noise field is not finite: check the noise section")
            write_polygons(truth_tmp / f"{name}.gpkg", *from_pixels(geoms, ids, info.transform, info.crs))
            write_polygons(labels_tmp / f"{name}.gpkg", *from_pixels(noisy, ids, info.transform, info.crs))
            write_geotiff(fields_tmp / f"{name}.tif", field, info.transform, info.crs, descriptions=bands)
            for key, value in stats.as_dict().items():
                totals[key] = totals.get(key, 0) + value
            logger.info("%s: %d buildings misaligned (max %.1f px)", name, len(geoms), cfg.max_displacement)
        if params is not None:
            write_manifest(labels_tmp, params, "misalign", "round0", city=city)
    totals["tiles"] = len(tiles)
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Misalign a city's true polygons with smooth random displacement fields.")
    parser.add_argument("--city", required=True, help="city name (a key of cities: in params.yaml)")
    parser.add_argument("--city-dir", type=Path, required=True, help="the city's fetched data (images/, polygons/)")
    parser.add_argument("--truth-out", type=Path, required=True)
    parser.add_argument("--labels-out", type=Path, required=True)
    parser.add_argument("--fields-out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    city = load_city(args.params, args.city)
    cfg = load_section(args.params, "noise", NoiseConfig)
    with stage_run(f"misalign@{args.city}", {"noise": dataclasses.asdict(cfg), "city": args.city}) as run:
        counts = misalign_city(args.city, city.tiles, args.city_dir, cfg, args.truth_out, args.labels_out, args.fields_out,
                               args.params)
        run.log_metrics(counts)


if __name__ == "__main__":
    main()
