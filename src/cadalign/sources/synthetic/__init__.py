"""Deterministic synthetic city: aerial-looking RGB tiles with exact building footprints.

This is the default, embedded data source: it needs no download and reproduces the Inria
layout (``images/``, ``gt/``) plus the "cadaster" polygons an OSM download would give
(``polygons/``). A tile is a small procedural city in one of three styles:

- ``dense``: a city centre, narrow streets, many medium buildings close together along the
  streets, some large courtyard blocks (polygons with a hole), paved ground.
- ``suburb``: wavy or straight streets, small houses set back in lawns, driveways, pools,
  many trees.
- ``industrial``: wide roads, few large halls with big flat (metal or concrete) roofs,
  aprons, parking lots with cars, dry grass.

Rendering (all numpy / OpenCV, pixel-centre convention of :mod:`cadalign.geo.tiles`):
multi-scale textured ground, road network with sidewalks, kerbs and dashed markings,
buildings as unions of rectangles (rectangle, L, T, courtyard) with gable, hip or flat roofs
lit by one sun, cast shadows along one direction that darken the ground but never roofs,
and trees (textured canopies with their own shadows) that may hide building edges. The
``mask`` is the footprint truth (trees do not remove mask pixels), rasterized from the
polygons with :func:`rasterio.features.rasterize`.

Bit-identical on any x86-64 CPU: see :mod:`.exact` for the arithmetic and drawing rules.

The parts, in the order a tile is made: :mod:`.styles` (the three styles' parameters and
colours), :mod:`.layout` (streets and footprints), :mod:`.render` (the image),
:mod:`.exact` (bit-exact arithmetic and drawing), :mod:`.tile` (:func:`generate_tile`,
:func:`tile_seed`) and :mod:`.write` (:func:`write_city`, the only part that writes geodata).
"""

from cadalign.sources.synthetic.styles import STYLES
from cadalign.sources.synthetic.tile import MIN_SIZE, SyntheticTile, generate_tile, tile_seed
from cadalign.sources.synthetic.write import write_city

__all__ = ["MIN_SIZE", "STYLES", "SyntheticTile", "generate_tile", "tile_seed", "write_city"]
