"""The three city styles (``dense``, ``suburb``, ``industrial``) and the colours of the synthetic city.

Lengths are in metres and converted with the tile's pixel size, so a tile at 0.3 m/px looks
like an Inria tile.
"""

from __future__ import annotations

from dataclasses import dataclass

STYLES = ("dense", "suburb", "industrial")


@dataclass(frozen=True)
class _Style:
    """Layout and look of one city style (lengths in metres)."""

    block: tuple[float, float]  # street spacing range
    asphalt: tuple[float, float]  # carriageway width range
    sidewalk: tuple[float, float]  # sidewalk width range (each side)
    wavy: float  # probability that a street family is wavy (sinusoidal)
    setback: tuple[float, float]  # distance from road edge to building front
    gap: float  # minimum distance between two buildings
    lot: tuple[float, float]  # frontage length of one building (along the street)
    depth: tuple[float, float]  # building depth (perpendicular to the street)
    shapes: tuple[float, float, float]  # probabilities of rectangle, L, T
    courtyards: float  # courtyard blocks per km of street
    fill: float  # extra random buildings per hectare, placed behind the frontage
    fill_size: tuple[float, float]  # side range of the extra buildings
    roofs: tuple[float, float, float]  # probabilities of gable, hip, flat
    palette: tuple[tuple[float, float, float], ...]  # roof base colours (RGB 0..1)
    height: tuple[float, float]  # building height range (sets the shadow length)
    trees: float  # trees per hectare
    tree_radius: tuple[float, float]  # canopy radius range
    ground: tuple[tuple[float, float, float], tuple[float, float, float]]  # two ground colours
    paved: float  # share of the ground that is paved (0 = all vegetation)
    parking: float  # parking lots per hectare
    pools: float  # probability that a house has a pool
    retry_step: float  # how far to move along the street after a blocked frontage lot


_TERRACOTTA = (0.62, 0.34, 0.26)


_BROWN_RED = (0.46, 0.27, 0.23)


_SLATE = (0.34, 0.35, 0.37)


_BROWN = (0.47, 0.39, 0.31)


_LIGHT_GREY = (0.70, 0.70, 0.68)


_WHITE = (0.86, 0.86, 0.84)


_BEIGE = (0.71, 0.65, 0.53)


_COPPER = (0.41, 0.55, 0.48)


_METAL = (0.60, 0.62, 0.64)


_DARK_GREY = (0.27, 0.27, 0.28)


_FLAT_PALETTE = (_LIGHT_GREY, _WHITE, _DARK_GREY, _BEIGE, _SLATE, _METAL)  # flat roofs of mostly pitched styles


_STYLES: dict[str, _Style] = {
    "dense": _Style(
        block=(50.0, 80.0), asphalt=(5.0, 7.5), sidewalk=(1.5, 2.5), wavy=0.0, setback=(0.3, 1.2),
        gap=0.6, lot=(10.0, 24.0), depth=(12.0, 20.0), shapes=(0.5, 0.3, 0.2), courtyards=2.0,
        fill=40.0, fill_size=(7.0, 18.0), roofs=(0.45, 0.2, 0.35),
        # repeated entries make a colour more common
        palette=(_TERRACOTTA,) * 3 + (_BROWN_RED,) * 2 + (_LIGHT_GREY,) * 2
        + (_SLATE, _BEIGE, _COPPER, _DARK_GREY, _BROWN),
        height=(8.0, 18.0), trees=12.0, tree_radius=(2.0, 4.0),
        ground=((0.58, 0.56, 0.52), (0.48, 0.47, 0.44)), paved=0.85, parking=0.0, pools=0.0, retry_step=2.0,
    ),
    "suburb": _Style(
        block=(65.0, 100.0), asphalt=(5.0, 7.0), sidewalk=(0.8, 1.5), wavy=0.6, setback=(4.0, 8.0),
        gap=3.0, lot=(13.0, 20.0), depth=(9.0, 13.0), shapes=(0.55, 0.35, 0.1), courtyards=0.0,
        fill=3.0, fill_size=(4.0, 7.0), roofs=(0.5, 0.4, 0.1),
        palette=(_TERRACOTTA, _BROWN_RED, _SLATE, _BROWN, _DARK_GREY, _LIGHT_GREY, _BEIGE),
        height=(4.0, 8.0), trees=90.0, tree_radius=(1.8, 5.0),
        ground=((0.33, 0.43, 0.22), (0.45, 0.47, 0.30)), paved=0.0, parking=0.0, pools=0.3, retry_step=8.0,
    ),
    "industrial": _Style(
        block=(110.0, 170.0), asphalt=(8.0, 11.0), sidewalk=(0.0, 1.0), wavy=0.0, setback=(4.0, 12.0),
        gap=6.0, lot=(35.0, 90.0), depth=(25.0, 55.0), shapes=(0.75, 0.2, 0.05), courtyards=0.0,
        fill=2.0, fill_size=(20.0, 45.0), roofs=(0.05, 0.0, 0.95),
        palette=(_LIGHT_GREY, _WHITE, _METAL, _DARK_GREY, _BEIGE, _SLATE),
        height=(7.0, 14.0), trees=6.0, tree_radius=(2.0, 4.0),
        ground=((0.55, 0.53, 0.40), (0.47, 0.45, 0.38)), paved=0.35, parking=4.0, pools=0.0, retry_step=10.0,
    ),
}


_GRASS = (0.34, 0.44, 0.22)


_ASPHALT = (0.30, 0.30, 0.31)


_CONCRETE = (0.66, 0.65, 0.62)


_POOL = (0.30, 0.62, 0.72)


_CARS = ((0.85, 0.85, 0.85), (0.12, 0.12, 0.13), (0.55, 0.12, 0.10), (0.20, 0.28, 0.50), (0.60, 0.60, 0.62))
