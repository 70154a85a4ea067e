"""On-the-fly training patches: image, misaligned polygon raster, displacement and seg targets.

Each sample is drawn fresh (no patch files on disk):

1. pick a tile (probability proportional to its area, or with ``weight_by="city"`` each
   city equally, split by area among its tiles; tiles without labels skipped) and a
   random rigid transform of the patch: rotation ``theta`` (uniform in [0, 2 pi)) and an
   optional vertical flip;
2. pick the patch centre uniformly such that the rotation-safe crop of side
   ``C = ceil(S * sqrt(2)) + crop_slack`` lies inside the tile (retrying until a true vertex
   falls inside the inner output window; see :class:`PatchConfig`). Along an axis where the
   tile is shorter than C the crop is centred and the image reflect-padded, as at inference;
3. draw a fresh smooth field ``F`` over the crop (:func:`cadalign.noise.random_displacement_field`)
   in the tile frame and misalign the current labels by its inverse: each vertex ``v`` moves to
   the point ``u`` that ``F`` moves onto it, ``u + F(u) = v`` (:meth:`Field.preimage`), so that
   ``F`` itself is the exact target;
4. express everything in the patch frame. The patch frame is an exact rigid transform of the
   tile frame, ``x_tile = c + A (p - S / 2)`` with ``A = R(theta) @ diag(1, +-1)``, so
   geometry is moved with that map (shapely), the image is resampled once through it
   (``cv2.warpAffine``, bilinear) and the field becomes ``F'(p) = A^T F(x_tile(p))`` --
   rotated in space *and* in its vector values, with the flip negating dy. Rasters are
   burned from the transformed geometry, so no raster is ever rotated.

A sample is a dict of float32 tensors: ``image`` (3, S, S) in [-1, 1], ``polys`` (3, S, S)
fill/edge/vertex of the misaligned input polygons (after polygon dropping), ``disp``
(2, O, O) = ``F' / max_displacement`` clipped to [-1, 1] (the displacement that moves the
input back onto the labels: ``u + F'(u) = v``), ``seg`` (4, O, O) background/fill/edge/vertex
of all current labels, and ``polys_out`` (3, O, O) = ``polys`` cropped to the output window.
The output window is the centred O x O square of the input, ``margin = (S - O) / 2``.

Determinism: sample ``k`` of data-loader worker ``w`` on DDP rank ``r`` is drawn from
``np.random.SeedSequence([seed, stream, r, w, k])``, so a run is reproducible for a fixed
(seed, number of workers, rank) and no global random state is touched.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import shapely
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cadalign.noise import random_displacement_field, sample_field
from cadalign.raster import downsample_image, rasterize_polygons, rasterizing, scale_geoms

logger = logging.getLogger(__name__)

FIELD_GRID = 256
"""Side of the grid a field is drawn on when ``field_extent`` is set; the field is that
grid stretched over ``field_extent`` px. Its bumps are then evaluated on 256 / 4 = 64 coarse
points per side, close to the 79 a per-crop field gets at S = 220 (C = 316)."""

PREIMAGE_MAX_ITER = 50
PREIMAGE_TOL_PX = 1e-6
"""Newton steps (cap) and the largest residual ``|u + F(u) - v|`` in px of :meth:`Field.preimage`."""


@dataclass(frozen=True, eq=False)
class TileData:
    """One training tile at full resolution.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        labels: object array of shapely (Multi)Polygons in full-resolution pixel coordinates:
            the current labels of the round (the targets the network learns from).
        ids: building ids, one per label (kept for bookkeeping; not used for sampling).
        city: the tile's city (any name; ``PatchConfig.weight_by = "city"`` draws cities equally).
    """

    image: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    city: str = ""


@dataclass(frozen=True)
class PatchConfig:
    """How training patches are cut, misaligned and augmented (one network = one ``ds``)."""

    ds: int = 1  # downsampling factor of the network these patches train (8, 4, 2 or 1)
    input_size: int = 220  # S: side of the network input (reference: 220)
    output_size: int = 100  # O: side of the network's valid output (reference: 100)
    # Largest |component| of the random field, px at the network's resolution. Also the
    # normaliser of the target (disp = F / max_displacement), so it must equal the model's
    # disp_max_px. After a rotation a vector may exceed it in one component; such target
    # values are clipped to [-1, 1] like the tanh output they are compared with.
    max_displacement: float = 4.0
    # Largest |component| of the random field as a multiple of max_displacement. The field's
    # rms is ~0.27 x its largest component, so at 1 it is ~1 px at the network's resolution and
    # the network learns to undo only k = s_F^2 / (s_F^2 + s_N^2) of label noise of rms s_N
    # (the rest is indistinguishable from the noise it was trained to ignore). Above 1 the
    # field is wider than the tanh range and the target values beyond it are clipped.
    field_scale: float = 1.0
    n_bumps: int = 30  # Gaussian bumps per field component (reference: 30)
    field_coarse_factor: int = 4  # bumps evaluated on a grid this much coarser (reference: 4)
    # Side (px, network resolution) of the square the field's unit coordinates span. None:
    # the crop C (a fresh field per crop, bump sigma ~ 0.045 C ~ 14 px). The reference drew
    # one field per full tile (e.g. 5000 / ds px), which is smoother at small ds; set this to
    # the tile side / ds to match it (the crop then sees a random window of the field).
    field_extent: float | None = None
    # Probability that each input polygon is kept in the input raster (reference
    # keep_poly_prob 0.1: the network must align from sparse polygons); the seg target
    # always keeps all of them.
    keep_prob: float = 0.1
    edge_width: float = 3.0  # edge band width in px of the polygon rasters (reference: 3)
    rotate: bool = True  # random rotation, uniform in [0, 2 pi)
    flip: bool = True  # vertical flip with probability 0.5
    # Photometric jitter on the image only (reference, tf.image on [0, 1] images):
    brightness: float = 0.25  # additive shift, uniform in +-brightness x 255
    contrast: float = 0.2  # factor uniform in [1 - contrast, 1 + contrast] about the mean
    saturation: float = 0.2  # factor uniform in [1 - saturation, 1 + saturation]
    crop_slack: int = 4  # px added to ceil(S sqrt 2) so the rotated input never leaves the crop
    # Centre draws before giving up on finding a true vertex in the output window by chance;
    # then the window is placed around a random vertex (rare unless labels are very sparse).
    max_tries: int = 50
    # How tiles are drawn: "area" (probability proportional to the tile's area) or "city" (each
    # city equally often, split by area among its tiles), so that a city with fewer or smaller
    # tiles is not a minority of the training.
    weight_by: Literal["area", "city"] = "area"
    # Where patches are made: "exact" (this module: shapely moves the polygons, rasterio burns
    # them, per patch on the CPU in loader workers) or "device" (cadalign.device_patches: the
    # labels burned once per tile, each batch resampled through one grid on the training device).
    sampler: Literal["exact", "device"] = "exact"
    # device sampler: most GB of tiles and label rasters kept on a GPU (None: half of its free
    # memory); beyond it they stay in host memory and each batch's crops are cut there.
    device_memory_gb: float | None = None
    seed: int = 0

    @property
    def margin(self) -> int:
        """Border between the input and the output window, ``(S - O) / 2``."""
        return (self.input_size - self.output_size) // 2

    @property
    def field_max(self) -> float:
        """Largest |component| of the random field, px at the network's resolution."""
        return self.field_scale * self.max_displacement

    @property
    def crop_size(self) -> int:
        """Side C of the rotation-safe crop the field is drawn over."""
        return math.ceil(self.input_size * math.sqrt(2.0)) + self.crop_slack

    def validate(self) -> None:
        """Check value ranges.

        Raises:
            ValueError: naming the offending key and the valid range.
        """
        if self.ds < 1:
            raise ValueError(f"ds={self.ds} must be >= 1")
        if not 0 < self.output_size < self.input_size:
            raise ValueError(
                f"output_size={self.output_size} must be positive and smaller than "
                f"input_size={self.input_size}"
            )
        if (self.input_size - self.output_size) % 2:
            raise ValueError(
                f"input_size - output_size = {self.input_size - self.output_size} must be even "
                "(a centred window)"
            )
        if not self.max_displacement > 0:
            raise ValueError(f"max_displacement={self.max_displacement} must be > 0 px")
        if not self.field_scale > 0:
            raise ValueError(f"field_scale={self.field_scale} must be > 0 (1: the field spans the tanh range)")
        if self.n_bumps < 1 or self.field_coarse_factor < 1:
            raise ValueError(
                f"n_bumps={self.n_bumps} and field_coarse_factor={self.field_coarse_factor} must be >= 1"
            )
        if self.field_extent is not None and self.field_extent < self.crop_size:
            raise ValueError(
                f"field_extent={self.field_extent} must be >= the crop size {self.crop_size} px, or null"
            )
        if not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob={self.keep_prob} must be in (0, 1]")
        if self.edge_width <= 0 or self.crop_slack < 0 or self.max_tries < 1:
            raise ValueError(
                f"edge_width={self.edge_width} must be > 0, crop_slack={self.crop_slack} >= 0, "
                f"max_tries={self.max_tries} >= 1"
            )
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.device_memory_gb is not None and not self.device_memory_gb > 0:
            raise ValueError(f"device_memory_gb={self.device_memory_gb} must be > 0, or null")


@dataclass(frozen=True, eq=False)
class Patch:
    """One sample, with the geometry it was made from (for tests and plots).

    Arrays are the sample's tensors as numpy (see the module docstring). Geometry is in the
    patch's input pixel frame (subtract ``margin`` for the output window's frame).

    Attributes:
        image, polys, disp, seg, polys_out: float32 arrays, as in :meth:`as_tensors`.
        field_px: (2, O, O) float32 unclipped target field in px (``disp`` before scaling).
        labels: current labels of the selected polygons, transformed to the patch frame.
        inputs: the same polygons misaligned (all of them, before dropping), patch frame.
        kept: bool mask, which of ``inputs`` were burned into ``polys``.
        indices: positions of ``labels`` / ``inputs`` in the source tile's labels.
        tile: index of the source tile; angle: rotation in radians; flipped: vertical flip.
        centre: (x, y) patch centre in the downsampled tile's pixel coordinates.
        field: the drawn noise field as a function of tile coordinates (its grid, origin and
            scale reproduce the draw, e.g. in :mod:`cadalign.device_patches`).
    """

    image: np.ndarray
    polys: np.ndarray
    disp: np.ndarray
    seg: np.ndarray
    polys_out: np.ndarray
    field_px: np.ndarray
    labels: np.ndarray
    inputs: np.ndarray
    kept: np.ndarray
    indices: np.ndarray
    tile: int
    angle: float
    flipped: bool
    centre: tuple[float, float]
    field: Field

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The training sample: dict of float32 tensors image, polys, disp, seg, polys_out."""
        names = ("image", "polys", "disp", "seg", "polys_out")
        return {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))) for name in names}


def downsample_tile(tile: TileData, ds: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A tile at the network's resolution: (image, labels, their vertices (N, 2)); None without a vertex.

    Raises:
        ValueError: if the image is not (H, W, 3) uint8 (``index`` names the tile).
    """
    if tile.image.ndim != 3 or tile.image.shape[2] != 3 or tile.image.dtype != np.uint8:
        raise ValueError(f"tile {index}: image must be (H, W, 3) uint8, got {tile.image.shape} {tile.image.dtype}")
    image, (sx, sy) = downsample_image(tile.image, ds)
    labels = scale_geoms(tile.labels, sx, sy)
    vertices = shapely.get_coordinates(labels)
    if len(vertices) == 0:
        logger.warning("tile %d has no label vertex; it is never sampled", index)
        return None
    return image, labels, vertices


@dataclass(frozen=True, eq=False)
class _Tile:
    image: np.ndarray  # (h, w, 3) uint8 at the network's resolution
    labels: np.ndarray  # geometries at the network's resolution
    vertices: np.ndarray  # (N, 2) all label coordinates
    tree: shapely.STRtree


class Field:
    """A displacement field as a function of tile coordinates, backed by a grid."""

    def __init__(self, grid: np.ndarray, origin: np.ndarray, scale: float) -> None:
        self.grid = grid.astype(np.float64)  # once: sampled several times per patch (the preimages)
        self.origin = origin  # tile coordinates of the grid's top-left corner
        self.scale = scale  # grid cells per tile pixel

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        return sample_field(self.grid, (xy - self.origin) * self.scale)

    def preimage(self, xy: np.ndarray) -> np.ndarray:
        """The points ``u`` that the field moves onto ``xy`` (N, 2): ``u + F(u) = xy`` to ``PREIMAGE_TOL_PX``.

        Newton's method on ``u + F(u) - xy`` from ``xy - F(xy)``, each step halved until the
        residual shrinks. Unlike the fixed-point iteration ``u = xy - F(u)`` it converges where
        ``F`` is steeper than 1 px/px (the training field at ds 4), as long as the map does not
        fold. The Jacobian is the bilinear field's own slope (a one-sided difference well inside
        a grid cell).
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        u = xy - self(xy)
        moved = self(u)  # F(u), kept with u: the residual and the slope's base need it
        residual = u + moved - xy
        h = 1e-3 / self.scale  # a thousandth of a grid cell, in tile px
        for _ in range(PREIMAGE_MAX_ITER):
            norm = np.hypot(residual[:, 0], residual[:, 1])
            todo = np.flatnonzero(np.abs(residual).max(axis=1, initial=0.0) >= PREIMAGE_TOL_PX)
            if len(todo) == 0:
                break
            at, r, here = u[todo], residual[todo], moved[todo]
            dx = (self(at + [h, 0.0]) - here) / h  # (dFx/dx, dFy/dx)
            dy = (self(at + [0.0, h]) - here) / h
            # (I + J) step = r with J = [[dFx/dx, dFx/dy], [dFy/dx, dFy/dy]], by Cramer's rule
            a, b, c, d = 1.0 + dx[:, 0], dy[:, 0], dx[:, 1], 1.0 + dy[:, 1]
            det = a * d - b * c
            safe = np.abs(det) > 1e-9
            det = np.where(safe, det, 1.0)
            step = np.where(safe[:, None], np.stack([d * r[:, 0] - b * r[:, 1], a * r[:, 1] - c * r[:, 0]], 1) / det[:, None], r)
            length = np.ones(len(todo))
            pending = np.arange(len(todo))
            for _ in range(30):  # halvings: a Newton step can overshoot across a kink of the bilinear field
                trial = at[pending] - length[pending, None] * step[pending]
                trial_moved = self(trial)
                trial_residual = trial + trial_moved - xy[todo[pending]]
                better = np.hypot(trial_residual[:, 0], trial_residual[:, 1]) < norm[todo[pending]]
                accepted = todo[pending[better]]
                u[accepted], moved[accepted], residual[accepted] = trial[better], trial_moved[better], trial_residual[better]
                pending = pending[~better]
                if len(pending) == 0:
                    break
                length[pending] /= 2.0
        left = int((np.abs(residual).max(axis=1, initial=0.0) >= PREIMAGE_TOL_PX).sum())
        if left:
            # only where the field folds (no single preimage): the closest point found stands
            logger.debug("%d of %d preimages above %.0e px after %d Newton steps", left, len(xy), PREIMAGE_TOL_PX, PREIMAGE_MAX_ITER)
        return u


def tile_probabilities(areas: np.ndarray, cities: Sequence[str], weight_by: str) -> np.ndarray:
    """Probability of drawing each tile: by area, or each city equally and by area among its tiles."""
    if weight_by == "area":
        return areas / areas.sum()
    names, index = np.unique(np.asarray(cities, dtype=object), return_inverse=True)
    city_area = np.bincount(index, weights=areas, minlength=len(names))
    return areas / city_area[index] / len(names)


def _orthogonal(angle: float, flipped: bool) -> np.ndarray:
    """``A = R(angle) @ diag(1, -1 if flipped else 1)``: patch axes -> tile axes."""
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    return rot @ np.diag([1.0, -1.0 if flipped else 1.0])


class PatchSampler:
    """Draws training patches from downsampled tiles (see the module docstring).

    Args:
        tiles: full-resolution tiles with their current labels.
        cfg: patch settings; ``cfg.ds`` selects the resolution.

    Raises:
        ValueError: if no tile has a label vertex, or an image is not (H, W, 3) uint8.
    """

    def __init__(self, tiles: Sequence[TileData], cfg: PatchConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.tiles: list[_Tile] = []
        self.tile_index: list[int] = []
        cities: list[str] = []
        for index, tile in enumerate(tiles):
            prepared = downsample_tile(tile, cfg.ds, index)
            if prepared is None:
                continue
            image, labels, vertices = prepared
            self.tiles.append(_Tile(image, labels, vertices, shapely.STRtree(labels)))
            self.tile_index.append(index)
            cities.append(tile.city)
        if not self.tiles:
            raise ValueError(
                f"none of the {len(tiles)} tiles has a label vertex; patches need at least one labelled tile"
            )
        areas = np.array([t.image.shape[0] * t.image.shape[1] for t in self.tiles], dtype=np.float64)
        self.tile_prob = tile_probabilities(areas, cities, cfg.weight_by)
        self.jitter = A.Compose(
            [
                A.RandomBrightnessContrast(
                    brightness_limit=cfg.brightness, contrast_limit=0.0, brightness_by_max=True, p=1.0
                ),
                A.ColorJitter(
                    brightness=0.0, contrast=cfg.contrast, saturation=cfg.saturation, hue=0.0, p=1.0
                ),
            ]
        )

    def _place(
        self, tile: _Tile, rot: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, bool]:
        """Choose a patch centre whose output window holds a true vertex.

        Returns:
            (centre, found_by_chance): False when the fallback anchored on a vertex.
        """
        cfg = self.cfg
        height, width = tile.image.shape[:2]
        half = np.array([min(cfg.crop_size, width), min(cfg.crop_size, height)]) / 2.0
        low, high = half, np.array([width, height]) - half
        lo_win, hi_win = -cfg.output_size / 2.0, cfg.output_size / 2.0  # output window about the centre
        reach = cfg.output_size / math.sqrt(2.0)  # circumradius of the output window
        for _ in range(cfg.max_tries):
            centre = rng.uniform(low, high)
            near = tile.vertices[np.abs(tile.vertices - centre).max(axis=1) <= reach]
            local = (near - centre) @ rot  # patch coordinates relative to the patch centre
            if np.any(np.all((local >= lo_win) & (local <= hi_win), axis=1)):
                return centre, True
        vertex = tile.vertices[rng.integers(len(tile.vertices))]
        offset = rng.uniform(lo_win, hi_win, size=2)
        return vertex - rot @ offset, False

    def draw(
        self, rng: np.random.Generator, angle: float | None = None, flipped: bool | None = None
    ) -> Patch:
        """Draw one patch.

        Args:
            rng: the only source of randomness (albumentations is reseeded from it).
            angle: force the rotation (radians); None draws it per ``cfg.rotate``.
            flipped: force the vertical flip; None draws it per ``cfg.flip``.

        Returns:
            The patch with its geometry.
        """
        cfg = self.cfg
        size, out, margin, crop = cfg.input_size, cfg.output_size, cfg.margin, cfg.crop_size
        k = int(rng.choice(len(self.tiles), p=self.tile_prob))
        tile = self.tiles[k]
        if angle is None:
            angle = float(rng.uniform(0.0, 2.0 * math.pi)) if cfg.rotate else 0.0
        if flipped is None:
            flipped = bool(rng.random() < 0.5) if cfg.flip else False
        rot = _orthogonal(angle, flipped)
        centre, by_chance = self._place(tile, rot, rng)
        if not by_chance:
            logger.debug("patch anchored on a vertex of tile %d after %d draws", k, cfg.max_tries)

        field = self._draw_field(centre, rng)
        pad = crop / 2.0 + 2.0 * cfg.field_max + cfg.edge_width
        candidates = np.sort(tile.tree.query(shapely.box(*(centre - pad), *(centre + pad))))
        chosen = tile.labels[candidates]

        def to_patch(xy: np.ndarray) -> np.ndarray:
            return (xy - centre) @ rot + size / 2.0

        labels = shapely.transform(chosen, to_patch)
        inputs = shapely.transform(chosen, lambda xy: to_patch(field.preimage(xy)))
        kept = rng.random(len(chosen)) < cfg.keep_prob

        polys = rasterize_polygons(inputs[kept], (size, size), edge_width=cfg.edge_width).astype(np.float32)
        seg3 = rasterize_polygons(labels, (out, out), offset=(margin, margin), edge_width=cfg.edge_width)
        seg = np.concatenate([1 - seg3.max(axis=0, keepdims=True), seg3]).astype(np.float32)

        # Target at the output window's pixel centres: F'(p) = A^T F(x_tile(p)), i.e. moved in
        # space and rotated in value (the inputs sit where F moves them onto the labels).
        centres = np.arange(out, dtype=np.float64) + 0.5 + margin - size / 2.0
        px, py = np.meshgrid(centres, centres)
        patch_offsets = np.stack([px.ravel(), py.ravel()], axis=1)
        vectors = field(centre + patch_offsets @ rot.T) @ rot
        field_px = vectors.T.reshape(2, out, out).astype(np.float32)
        disp = np.clip(field_px / cfg.max_displacement, -1.0, 1.0)

        image = self._warp_image(tile.image, centre, rot, rng)
        return Patch(
            image=image,
            polys=polys,
            disp=disp,
            seg=seg,
            polys_out=polys[:, margin : margin + out, margin : margin + out].copy(),
            field_px=field_px,
            labels=labels,
            inputs=inputs,
            kept=kept,
            indices=candidates,
            tile=self.tile_index[k],
            angle=angle,
            flipped=flipped,
            centre=(float(centre[0]), float(centre[1])),
            field=field,
        )

    def _draw_field(self, centre: np.ndarray, rng: np.random.Generator) -> Field:
        """A fresh field over the crop around ``centre`` (tile frame, vectors in tile axes)."""
        cfg = self.cfg
        crop = cfg.crop_size
        corner = centre - crop / 2.0
        if cfg.field_extent is None:
            grid = random_displacement_field(
                (crop, crop), cfg.field_max, cfg.n_bumps, rng, coarse_factor=cfg.field_coarse_factor
            )
            return Field(grid, corner, 1.0)
        grid = random_displacement_field(
            (FIELD_GRID, FIELD_GRID),
            cfg.field_max,
            cfg.n_bumps,
            rng,
            coarse_factor=cfg.field_coarse_factor,
        )
        # The crop sees a random window of a field that spans field_extent px.
        window = rng.uniform(0.0, cfg.field_extent - crop, size=2)
        return Field(grid, corner - window, FIELD_GRID / cfg.field_extent)

    def _warp_image(
        self, image: np.ndarray, centre: np.ndarray, rot: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Resample the S x S input window through the patch transform, jitter, scale to [-1, 1]."""
        size = self.cfg.input_size
        # Pixel (col j, row i) of the patch has its centre at p = (j + .5, i + .5); its source
        # centre is c + A (p - S/2), i.e. source index = A (j, i) + c + A (.5 - S/2) - .5.
        shift = centre + rot @ np.full(2, 0.5 - size / 2.0) - 0.5
        matrix = np.hstack([rot, shift[:, None]])
        patch = cv2.warpAffine(
            image,
            matrix,
            (size, size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT_101,
        )
        self.jitter.set_random_seed(int(rng.integers(2**31)))
        patch = self.jitter(image=patch)["image"]
        return (patch.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


class PatchDataset(IterableDataset):
    """An endless stream of training samples (dicts of float32 tensors); stop it by steps.

    Sample ``k`` of worker ``w`` uses ``SeedSequence([cfg.seed, stream, rank, w, k])``;
    every worker and rank draws its own independent stream. Use ``stream`` to get a fresh
    sequence instead of repeating the first one; :meth:`resumed` continues a stream instead.

    Args:
        tiles: full-resolution tiles with their current labels.
        cfg: patch settings.
        rank: the DDP rank of this process (0 without DDP).
        stream: extra seed component.
    """

    def __init__(self, tiles: Sequence[TileData], cfg: PatchConfig, rank: int = 0, stream: int = 0) -> None:
        super().__init__()
        if rank < 0 or stream < 0:
            raise ValueError(f"rank={rank} and stream={stream} must be >= 0")
        self.sampler = PatchSampler(tiles, cfg)
        self.rank = rank
        self.stream = stream
        self.start_step, self.batch_size = 0, 1

    def resumed(self, step: int, batch_size: int) -> PatchDataset:
        """This stream as a ``DataLoader(batch_size=batch_size)`` restarted at ``step`` yields it.

        The loader hands out batches round robin over its workers from worker 0 (``in_order``,
        the default): step ``t`` is batch ``t // W`` of worker ``t % W``. The restarted loader's
        worker ``p`` so plays worker ``(p + step) % W`` from sample ``((step + p) // W) * batch_size``
        (without workers, ``W`` is 1). At step 0 this is the stream itself.
        """
        if step < 0 or batch_size < 1:
            raise ValueError(f"step={step} must be >= 0 and batch_size={batch_size} >= 1")
        resumed = copy.copy(self)
        resumed.start_step, resumed.batch_size = step, batch_size
        return resumed

    def generator(self, index: int, worker: int = 0) -> np.random.Generator:
        """The random generator of sample ``index`` of ``worker`` (for reproducing a sample)."""
        seq = np.random.SeedSequence([self.sampler.cfg.seed, self.stream, self.rank, worker, index])
        return np.random.default_rng(seq)

    def sample(self, index: int, worker: int = 0) -> dict[str, torch.Tensor]:
        """Sample ``index`` of ``worker``'s stream, exactly as iteration yields it."""
        return self.sampler.draw(self.generator(index, worker)).as_tensors()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        physical, workers = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (physical + self.start_step) % workers  # see resumed()
        index = (self.start_step + physical) // workers * self.batch_size
        with rasterizing():
            while True:
                yield self.sample(index, worker)
                index += 1
