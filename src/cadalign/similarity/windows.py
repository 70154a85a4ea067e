"""Window selection of the similarity analysis: which patches of which tile are analysed.

The same patches for every round, chosen from the TRUE polygons (so the set does not depend
on the round's labels), in downsampled pixels (:func:`cadalign.raster.downsample_image`):

1. :func:`grid_windows` lays a regular grid of ``S x S`` input windows over a downsampled
   tile (top-left window at the tile origin; windows that would cross the right or bottom
   border are dropped), with step ``S`` (``grid: input``, the reference) or the output side
   ``O`` (``grid: output``: output regions tile the tile, no output pixel in two patches);
2. :func:`windows_with_vertex` keeps those whose OUTPUT region (the central ``O x O``
   square, ``margin = (S - O) / 2``) holds a true vertex (``keep: vertex``, as training
   patches), or :func:`windows_with_polygon` those whose output region fully contains a
   true polygon (``keep: polygon``, the reference);
3. :func:`select_windows` keeps up to ``per_tile`` of them per tile, drawn with
   ``np.random.default_rng([seed, crc32(tile name)])`` -- a tile's choice depends on its
   name and the seed only, not on which other tiles are in the study;
4. :func:`cap_patches` keeps ``max_patches`` of all tiles' windows by a seeded draw.

:func:`tile_windows` runs steps 1-3 on one tile. :func:`vertices_per_window` also tells
which vertices a window's output moves (the explanation test).
"""

from __future__ import annotations

import zlib
from typing import Literal

import numpy as np
import shapely

from cadalign.raster import downsampled_shape, scale_geoms

CAP_STREAM = 2
"""Second word of the seed of the draw under ``max_patches``."""


def tile_windows(
    shape: tuple[int, int],
    geoms: np.ndarray,
    ds: int,
    size: int,
    margin: int,
    *,
    grid: Literal["output", "input"],
    keep: Literal["vertex", "polygon"],
    per_tile: int | None,
    seed: int,
    name: str,
) -> np.ndarray:
    """The windows of one tile: grid, true vertex (or polygon) in the output region, seeded choice.

    Args:
        shape: ``(H, W)`` of the full-resolution tile.
        geoms: The tile's TRUE polygons (full-resolution pixel coordinates).
        ds: Downsampling factor.
        size: Window side ``S`` (px at ``ds``).
        margin: ``(S - O) / 2``.
        grid: ``"output"``: step ``O``; ``"input"``: step ``S`` (``similarity.grid``).
        keep: ``"vertex"`` or ``"polygon"`` in the output region (``similarity.keep``).
        per_tile: Largest number kept (``similarity.patches_per_tile``); None keeps all.
        seed: Study seed of the choice (``similarity.seed``).
        name: ``city/tile``; with ``seed`` it fixes the draw.

    Returns:
        ``(m, 2)`` int64 corners ``(x0, y0)`` in downsampled px, in grid order.
    """
    height, width = shape
    new_h, new_w = downsampled_shape(height, width, ds)
    stride = size - 2 * margin if grid == "output" else size
    corners = grid_windows(new_h, new_w, size, stride)
    geoms = scale_geoms(geoms, new_w / width, new_h / height)
    if keep == "vertex":
        kept = windows_with_vertex(corners, size, margin, shapely.get_coordinates(geoms))
    else:
        kept = windows_with_polygon(corners, size, margin, shapely.bounds(geoms))
    return select_windows(corners[kept], per_tile, seed, name)


def grid_windows(height: int, width: int, size: int, stride: int | None = None) -> np.ndarray:
    """Top-left corners of a regular grid of ``size x size`` windows inside an image.

    With ``stride = size`` (the default) the windows do not overlap. With ``stride`` = the
    network's OUTPUT side ``O`` the input windows share their margins (context) but their
    output regions (``[x0 + margin, x0 + margin + O)``) tile the image without overlap:
    every window that fits in the image, no output pixel in two patches.

    Args:
        height: Image rows.
        width: Image columns.
        size: Window side in pixels (>= 1).
        stride: Step between windows (>= 1); None: ``size``.

    Returns:
        ``(n, 2)`` int64 array of ``(x0, y0)`` (column, row), row-major; empty if the image
        is smaller than one window.

    Raises:
        ValueError: if ``size`` or ``stride`` < 1.
    """
    stride = size if stride is None else stride
    if size < 1 or stride < 1:
        raise ValueError(f"window size {size} and stride {stride} must be >= 1 px")
    xs = np.arange(0, width - size + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - size + 1, stride, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def windows_with_polygon(windows: np.ndarray, size: int, margin: int, bounds: np.ndarray) -> np.ndarray:
    """Which windows have an output region that fully contains at least one polygon.

    A polygon lies inside the (convex) square output region exactly when its bounding box
    does, so bounds suffice.

    Args:
        windows: ``(n, 2)`` top-left corners ``(x0, y0)`` of the input windows.
        size: Input window side ``S``.
        margin: ``(S - O) / 2``; the output region is ``[x0 + margin, x0 + S - margin]``
            (and likewise in y), in the same pixel coordinates as ``bounds``.
        bounds: ``(m, 4)`` polygon bounds ``(minx, miny, maxx, maxy)`` (``shapely.bounds``).

    Returns:
        ``(n,)`` bool mask.

    Raises:
        ValueError: on bad shapes or a margin that leaves no output region.
    """
    windows = np.asarray(windows).reshape(-1, 2)
    bounds = np.asarray(bounds, dtype=float).reshape(-1, 4)
    if not 0 <= 2 * margin < size:
        raise ValueError(f"margin {margin} leaves no output region in a {size} px window")
    if len(bounds) == 0 or len(windows) == 0:
        return np.zeros(len(windows), dtype=bool)
    lo = windows[:, None, :] + margin  # (n, 1, 2)
    hi = windows[:, None, :] + size - margin
    inside = (bounds[None, :, :2] >= lo) & (bounds[None, :, 2:] <= hi)  # (n, m, 2)
    return inside.all(-1).any(-1)


def windows_with_vertex(windows: np.ndarray, size: int, margin: int, vertices: np.ndarray) -> np.ndarray:
    """Which windows have at least one vertex in their output region (as training patches need).

    The output region is the half-open square ``[x0 + margin, x0 + size - margin)`` (and
    likewise in y), so on a grid of stride ``size - 2 margin`` each point lies in one region.

    Args:
        windows: ``(n, 2)`` top-left corners ``(x0, y0)``.
        size: Input window side ``S``.
        margin: ``(S - O) / 2``.
        vertices: ``(m, 2)`` vertex coordinates, same pixel frame as ``windows``.

    Returns:
        ``(n,)`` bool mask.

    Raises:
        ValueError: if the margin leaves no output region.
    """
    return vertices_per_window(windows, size, margin, vertices).any(0)


def vertices_per_window(windows: np.ndarray, size: int, margin: int, vertices: np.ndarray) -> np.ndarray:
    """``(m, n)`` bool: vertex ``i`` lies in the (half-open) output region of window ``j``.

    Args:
        windows: ``(n, 2)`` top-left corners ``(x0, y0)``.
        size: Input window side ``S``.
        margin: ``(S - O) / 2``.
        vertices: ``(m, 2)`` coordinates ``(x, y)`` in the frame of ``windows``.

    Returns:
        The membership matrix.

    Raises:
        ValueError: if the margin leaves no output region.
    """
    windows = np.asarray(windows).reshape(-1, 2)
    vertices = np.asarray(vertices, dtype=float).reshape(-1, 2)
    if not 0 <= 2 * margin < size:
        raise ValueError(f"margin {margin} leaves no output region in a {size} px window")
    lo = windows[None, :, :] + margin  # (1, n, 2)
    hi = windows[None, :, :] + size - margin
    return ((vertices[:, None, :] >= lo) & (vertices[:, None, :] < hi)).all(-1)


def select_windows(candidates: np.ndarray, per_tile: int | None, seed: int, tile_name: str) -> np.ndarray:
    """Up to ``per_tile`` of a tile's candidate windows, drawn without replacement.

    Args:
        candidates: ``(n, 2)`` candidate corners, in grid order.
        per_tile: Largest number kept (>= 1); None keeps all.
        seed: Study seed of the patch choice.
        tile_name: The tile's name; with ``seed`` it fixes the draw.

    Returns:
        ``(min(n, per_tile), 2)`` corners, in grid order.

    Raises:
        ValueError: if ``per_tile`` < 1.
    """
    if per_tile is not None and per_tile < 1:
        raise ValueError(f"patches_per_tile={per_tile} must be >= 1 or null (every window)")
    candidates = np.asarray(candidates).reshape(-1, 2)
    if per_tile is None or len(candidates) <= per_tile:
        return candidates
    rng = np.random.default_rng([seed, zlib.crc32(tile_name.encode())])
    return candidates[np.sort(rng.choice(len(candidates), per_tile, replace=False))]


def cap_patches(n: int, max_patches: int | None, seed: int) -> np.ndarray:
    """Indices of the patches kept when there are more than ``max_patches``: a seeded draw, sorted.

    Args:
        n: Number of candidate patches.
        max_patches: Largest number kept (>= 1); None keeps all.
        seed: Study seed (generator ``default_rng([seed, CAP_STREAM])``).

    Returns:
        ``(min(n, max_patches),)`` int64 sorted indices.

    Raises:
        ValueError: if ``max_patches`` < 1.
    """
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches={max_patches} must be >= 1 or null (no cap)")
    if max_patches is None or n <= max_patches:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, CAP_STREAM])
    return np.sort(rng.choice(n, max_patches, replace=False)).astype(np.int64)
