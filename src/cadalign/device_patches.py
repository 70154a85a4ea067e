"""Training patches made a batch at a time on the training device (``train.patches.sampler: device``).

The same samples as :class:`cadalign.patches.PatchSampler` (read its module docstring first),
made differently:

- once per network (one ``ds``): each tile is downsampled and its current labels are burned
  at that resolution into fill/edge/vertex bits (:func:`cadalign.raster.rasterize_polygons`,
  as the exact path burns them); image and label bits stay on the device, one 32-bit word per
  pixel (R, G, B, bits), so a batch's crops are one gather;
- per batch, everything is drawn on the device from a ``torch.Generator`` seeded by
  ``(seed, rank, step)``: tile (:func:`~cadalign.patches.tile_probabilities`), rotation, flip,
  centre (candidates rejected until the rotated output window holds a label vertex, as
  ``PatchSampler._place``), the smooth field (the bumps of :func:`cadalign.noise.random_displacement_field`,
  ``field_extent`` windowing, ``field_scale``), photometric jitter and polygon dropping;
- each patch is rendered through ONE sampling grid: patch pixel ``p`` sits at the tile point
  ``x = c + A (p - S/2)``. The image and the seg target sample the tile at ``x``; the
  misaligned input raster samples the labels at ``x + F(x)`` (the label at ``v`` shows at the
  ``u`` with ``u + F(u) = v``, where the exact path moves the vertex), and the target is
  ``A^T F(x) / max_displacement`` clipped to [-1, 1]: one sample of the field serves both.
  The grid is made in float32 relative to a crop cut around each centre (points under a crop's
  side, so exact to ~1e-5 px), by ``affine_grid``; batch-wide tensor ops throughout, no loop
  over patches.

Warping the burned rasters instead of the polygons moves each boundary by up to a tile pixel's
interpolation error (the burn is at the network's own resolution); tests/test_device_patches.py
measures the agreement with the exact path on the same draws.

Polygon dropping (``keep_prob`` < 1) uses an owner raster: every pixel holds the id of the
polygon it belongs to (its fill, or the nearest polygon for edge and vertex pixels outside), and
a patch drops the pixels of the polygons it does not keep.

Memory: the tiles go to the device unless they exceed ``device_memory_gb``; then they stay in
host memory and each batch's crops are cut there and copied over. Streaming tiles through a
bounded device cache instead would make a batch depend on what happens to be cached (or bias
the tile draw), and the study's data (e.g. 180 Inria tiles at ds 1: ~18 GB) fits a large GPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from cadalign.noise import BUMP_VARIANCE
from cadalign.patches import (
    FIELD_GRID,
    Patch,
    PatchConfig,
    TileData,
    downsample_tile,
    tile_probabilities,
)
from cadalign.raster import EDGE, FILL, VERTEX, rasterize_polygons

logger = logging.getLogger(__name__)

CANDIDATES_PER_ROUND = 8
"""Centre candidates drawn at once per patch; another round only for patches none of them fit."""

BUMP_REACH = 4.0
"""Bumps are evaluated out to this many of their largest possible sigma (``sqrt(BUMP_VARIANCE)``)."""

GRAY = (0.299, 0.587, 0.114)
"""RGB -> gray weights of OpenCV's ``COLOR_RGB2GRAY``, which the albumentations jitter uses."""


@dataclass(frozen=True)
class Draws:
    """The random choices of one batch (tensors on the sampler's device); :meth:`DeviceSampler.render` makes the patches.

    Attributes:
        tile: (B,) long, index into the sampler's tiles (those with a label vertex).
        centre: (B, 2) float64, patch centre (x, y) in the downsampled tile's pixels.
        angle: (B,) float64 rotation (radians); flipped: (B,) bool vertical flip.
        field: (B, 2, h, w) float32 field grid in px (dx, dy), sampled bilinearly, edges clamped.
        field_origin: (B, 2) float64 tile point of the grid's top-left corner.
        field_span: (B,) float64 tile px the grid's side spans.
        keep: (B, n_owners + 1) bool, which polygon ids each patch keeps; None keeps all.
        jitter: (B, 4) float32 brightness shift (x 255), contrast factor, saturation factor,
            and 1 where contrast is applied before saturation.
    """

    tile: torch.Tensor
    centre: torch.Tensor
    angle: torch.Tensor
    flipped: torch.Tensor
    field: torch.Tensor
    field_origin: torch.Tensor
    field_span: torch.Tensor
    keep: torch.Tensor | None
    jitter: torch.Tensor


def orthogonal(angle: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """``A = R(angle) @ diag(1, -1 if flipped else 1)`` per patch: (B, 2, 2), patch axes -> tile axes."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    sign = 1.0 - 2.0 * flipped.to(angle.dtype)
    return torch.stack([torch.stack([cos, -sin * sign], -1), torch.stack([sin, cos * sign], -1)], -2)


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of batch ``step`` on ``rank``: a pure function of the three, so a resume redraws it."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def owner_raster(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """int32 raster of 1-based polygon ids: the polygon a pixel's centre lies in, else the nearest one.

    Exteriors are filled with OpenCV (pixel centres at integer coordinates there, hence the
    half-pixel shift); overlapping polygons: the later one wins.
    """
    owner = np.zeros(shape, dtype=np.int32)
    shift = 4  # sub-pixel bits of cv2.fillPoly
    for i, geom in enumerate(labels, start=1):
        rings = [
            np.round((np.asarray(poly.exterior.coords)[:, :2] - 0.5) * (1 << shift)).astype(np.int32)
            for poly in shapely.get_parts(geom)
        ]
        cv2.fillPoly(owner, rings, int(i), lineType=cv2.LINE_8, shift=shift)
    if owner.any():
        nearest = ndimage.distance_transform_edt(owner == 0, return_distances=False, return_indices=True)
        owner = owner[nearest[0], nearest[1]]
    return owner


def _reflect101(index: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Indices mirrored into [0, size) without repeating the edge pixel (OpenCV's BORDER_REFLECT_101)."""
    period = torch.clamp(2 * (size - 1), min=1)
    index = torch.remainder(index.abs(), period)
    return torch.where(index >= size, period - index, index).clamp(max=size - 1)


class DeviceSampler:
    """Draws and renders whole training batches on one device (see the module docstring).

    Args:
        tiles: full-resolution tiles with their current labels.
        cfg: patch settings; ``cfg.ds`` selects the resolution.
        batch_size: patches per :meth:`batch`.
        device: where batches are drawn and returned.
        rank: DDP rank (a seed component; each rank draws its own batches).

    Raises:
        ValueError: if no tile has a label vertex, or an image is not (H, W, 3) uint8.
    """

    def __init__(
        self,
        tiles: Sequence[TileData],
        cfg: PatchConfig,
        batch_size: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
    ) -> None:
        cfg.validate()
        if batch_size < 1 or rank < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and rank={rank} >= 0")
        self.cfg, self.batch_size, self.rank = cfg, batch_size, rank
        self.device = torch.device(device)
        # Crop cut around each centre: the rotated input plus the reach of the field and of bilinear taps.
        self.crop = math.ceil(cfg.input_size * math.sqrt(2.0)) + 2 * math.ceil(cfg.field_max) + 4
        pixels, owners, vertices, sizes, cities = [], [], [], [], []
        self.tile_index: list[int] = []
        for index, tile in enumerate(tqdm(tiles, desc=f"burn ds{cfg.ds}", unit="tile", disable=len(tiles) < 20)):
            prepared = downsample_tile(tile, cfg.ds, index)
            if prepared is None:
                continue
            image, geoms, coords = prepared
            shape = image.shape[:2]
            burned = rasterize_polygons(geoms, shape, edge_width=cfg.edge_width)
            bits = burned[FILL] | burned[EDGE] << 1 | burned[VERTEX] << 2
            # One 32-bit word per pixel (R, G, B, label bits): a crop is one gather.
            pixels.append(np.concatenate([image.reshape(-1, 3), bits.reshape(-1, 1)], 1).view(np.int32).ravel())
            if cfg.keep_prob < 1:
                owners.append(owner_raster(geoms, shape).ravel())
            vertices.append(coords)
            sizes.append(shape)
            cities.append(tile.city)
            self.tile_index.append(index)
        if not sizes:
            raise ValueError(
                f"none of the {len(tiles)} tiles has a label vertex; patches need at least one labelled tile"
            )
        heights, widths = np.array(sizes).T
        self.n_owners = max((len(t.labels) for t in tiles), default=0)
        self.tile_prob = torch.tensor(
            tile_probabilities((heights * widths).astype(np.float64), cities, cfg.weight_by), device=self.device
        )
        n_vertices = np.array([len(v) for v in vertices])
        # Far, not inf, padding: rotated, inf can give nan (inf - inf), which no comparison should meet.
        padded = np.full((len(vertices), n_vertices.max(), 2), 1e30)
        for i, v in enumerate(vertices):
            padded[i, : len(v)] = v
        to_dev = {"device": self.device}
        self.vertices = torch.tensor(padded, **to_dev)  # the padding never falls in a window
        self.n_vertices = torch.tensor(n_vertices, **to_dev)
        self.heights = torch.tensor(heights, **to_dev)
        self.widths = torch.tensor(widths, **to_dev)
        self.base = torch.tensor(np.concatenate([[0], np.cumsum(heights * widths)[:-1]]), **to_dev)
        store = self._store_device(sum(a.nbytes for a in pixels + owners))
        self.pixels = torch.from_numpy(np.concatenate(pixels)).to(store)
        self.owners = torch.from_numpy(np.concatenate(owners)).to(store) if owners else None
        if store.type == "cpu" and self.device.type == "cuda":
            self.pixels = self.pixels.pin_memory()
            self.owners = self.owners.pin_memory() if self.owners is not None else None
        self.store = store
        # Side of the coarse grid the field's bumps are evaluated on, as random_displacement_field does.
        side = FIELD_GRID if cfg.field_extent is not None else cfg.crop_size
        coarse = max(2, math.ceil(side / cfg.field_coarse_factor))
        self.coarse_side = coarse

    def _store_device(self, nbytes: int) -> torch.device:
        """The device the tiles are kept on: the sampler's, unless they exceed the memory cap."""
        if self.device.type == "cpu":
            return self.device
        cap = self.cfg.device_memory_gb
        if cap is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            cap = free / 2 / 1e9
        if nbytes / 1e9 <= cap:
            logger.info("device sampler: %.2f GB of tiles on %s", nbytes / 1e9, self.device)
            return self.device
        logger.warning(
            "device sampler: the tiles take %.2f GB, over train.patches.device_memory_gb (%.2f GB): they "
            "stay in host memory and each batch's crops are copied to %s (slower; raise the cap if it fits)",
            nbytes / 1e9,
            cap,
            self.device,
        )
        return torch.device("cpu")

    # ------------------------------------------------------------------------- drawing

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Batch ``step`` of this rank: a pure function of (``cfg.seed``, rank, step)."""
        return self.render(self.draw(step_generator(self.cfg.seed, self.rank, step, self.device)))

    def draw(self, g: torch.Generator) -> Draws:
        """Draw the random choices of one batch from ``g``."""
        cfg, n, dev = self.cfg, self.batch_size, self.device
        f64 = {"dtype": torch.float64, "device": dev, "generator": g}
        tile = torch.multinomial(self.tile_prob, n, replacement=True, generator=g)
        angle = torch.rand(n, **f64) * (2.0 * math.pi) if cfg.rotate else torch.zeros(n, dtype=torch.float64, device=dev)
        flipped = torch.rand(n, **f64) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool, device=dev)
        centre = self._place(tile, orthogonal(angle, flipped), g)
        field, origin, span = self._draw_field(centre, g)
        keep = None
        if cfg.keep_prob < 1:
            keep = torch.rand(n, self.n_owners + 1, **f64) < cfg.keep_prob
        u = torch.rand(n, 4, **f64)
        jitter = torch.stack(
            [
                (2.0 * u[:, 0] - 1.0) * cfg.brightness * 255.0,
                1.0 + (2.0 * u[:, 1] - 1.0) * cfg.contrast,
                1.0 + (2.0 * u[:, 2] - 1.0) * cfg.saturation,
                (u[:, 3] < 0.5).to(torch.float64),
            ],
            -1,
        ).float()
        return Draws(tile, centre, angle, flipped, field, origin, span, keep, jitter)

    def _place(self, tile: torch.Tensor, rot: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Centres whose rotated output window holds a label vertex (uniform among those, as ``_place``)."""
        cfg, n = self.cfg, len(tile)
        size = torch.stack([self.widths[tile], self.heights[tile]], -1).to(torch.float64)
        half = torch.clamp(size, max=cfg.crop_size) / 2.0
        low, span = half, size - 2.0 * half
        vertices = self.vertices[tile]  # (B, V, 2)
        rotated = torch.einsum("bvi,bij->bvj", vertices, rot)  # in each window's axes: R^T v
        window = cfg.output_size / 2.0
        centre = torch.zeros(n, 2, dtype=torch.float64, device=self.device)
        found = torch.zeros(n, dtype=torch.bool, device=self.device)
        tries = 0
        while tries < cfg.max_tries:
            k = min(CANDIDATES_PER_ROUND, cfg.max_tries - tries)
            cand = low[:, None] + torch.rand(n, k, 2, dtype=torch.float64, device=self.device, generator=g) * span[:, None]
            # in the window's axes, the largest of |dx|, |dy| to each vertex: a Chebyshev distance
            hit = (torch.cdist(torch.einsum("bki,bij->bkj", cand, rot), rotated, p=math.inf) <= window).any(-1)
            first = hit.to(torch.int8).argmax(1)
            take = hit.any(1) & ~found
            centre = torch.where(take[:, None], cand[torch.arange(n, device=self.device), first], centre)
            found |= take
            tries += k
            if bool(found.all()):
                break
        # Rare (very sparse labels): anchor the window on a random vertex, as the exact path does.
        pick = (torch.rand(n, dtype=torch.float64, device=self.device, generator=g) * self.n_vertices[tile]).long()
        offset = (torch.rand(n, 2, dtype=torch.float64, device=self.device, generator=g) - 0.5) * cfg.output_size
        anchored = vertices[torch.arange(n, device=self.device), pick] - torch.einsum("bij,bj->bi", rot, offset)
        if not bool(found.all()):
            logger.debug("%d patches anchored on a vertex after %d draws", int((~found).sum()), cfg.max_tries)
        return torch.where(found[:, None], centre, anchored)

    def _draw_field(self, centre: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coarse bump grids (B, 2, h, w) in px, their tile origins and spans (see ``random_displacement_field``)."""
        cfg, n, dev = self.cfg, len(centre), self.device
        f64 = {"dtype": torch.float64, "device": dev, "generator": g}
        bumps = (n, 2, cfg.n_bumps)
        mean = torch.rand(*bumps, 2, **f64)
        theta = torch.rand(*bumps, **f64) * math.pi
        eig = 0.2 + 0.8 * torch.rand(*bumps, 2, **f64)
        sign = torch.where(torch.rand(*bumps, **f64) < 0.5, -1.0, 1.0)
        # inverse covariance R diag(1 / eig) R^T / BUMP_VARIANCE, as entries a, b, c
        cos, sin = torch.cos(theta), torch.sin(theta)
        inv = 1.0 / (eig * BUMP_VARIANCE)
        a = cos * cos * inv[..., 0] + sin * sin * inv[..., 1]
        b = cos * sin * (inv[..., 0] - inv[..., 1])
        c = sin * sin * inv[..., 0] + cos * cos * inv[..., 1]
        # Each bump only on the cells within BUMP_REACH of its widest sigma (beyond: < exp(-8) of its
        # height): ~1/7 of the grid's exps at 64 x 64 cells, the bulk of a batch's CPU time otherwise.
        side = self.coarse_side
        step = 1.0 / (side - 1)
        reach = math.ceil(BUMP_REACH * math.sqrt(BUMP_VARIANCE) / step)
        near = torch.arange(-reach, reach + 1, device=dev)
        cell = torch.round(mean / step).long()  # (B, 2, n, 2) nearest cell (x, y)
        cols = cell[..., 0, None] + near  # (B, 2, n, W)
        rows = cell[..., 1, None] + near
        dx = (cols * step - mean[..., 0, None]).float()[..., None, :]  # (B, 2, n, 1, W)
        dy = (rows * step - mean[..., 1, None]).float()[..., :, None]  # (B, 2, n, W, 1)
        a, b, c = (-0.5 * t.float()[..., None, None] for t in (a, b, c))
        # the exponent as one product and two sums of broadcast factors: 4 passes over the cells, not 9
        bump = torch.addcmul(a * dx * dx, 2.0 * b * dx, dy).add_(c * dy * dy).exp_().mul_(sign.float()[..., None, None])
        # Summed into a grid padded by the reach, then cut: no masks for the cells beyond the edges.
        padded = side + 2 * reach
        flat = (rows + reach)[..., :, None] * padded + (cols + reach)[..., None, :]
        values = torch.zeros(n, 2, padded * padded, device=dev)
        values.scatter_add_(2, flat.reshape(n, 2, -1), bump.reshape(n, 2, -1))
        values = values.reshape(n, 2, padded, padded)[..., reach : reach + side, reach : reach + side].reshape(n, 2, -1)
        lo, hi = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
        spread = hi - lo
        values = torch.where(spread > 0, 2.0 * (values - lo) / spread.clamp(min=1e-30) - 1.0, 0.0)
        field = (values * cfg.field_max).reshape(n, 2, self.coarse_side, self.coarse_side)
        corner = centre - cfg.crop_size / 2.0
        if cfg.field_extent is None:
            span = torch.full((n,), float(cfg.crop_size), dtype=torch.float64, device=dev)
            return field, corner, span
        window = torch.rand(n, 2, **f64) * (cfg.field_extent - cfg.crop_size)
        span = torch.full((n,), float(cfg.field_extent), dtype=torch.float64, device=dev)
        return field, corner - window, span

    # ------------------------------------------------------------------------- rendering

    def _crops(self, draws: Draws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crops around the centres: float32 image (B, 3, M, M) (a channels-last view), label planes
        (B, 3 or 4, M, M): fill, edge, vertex (, owner id), and the crops' tile corners (B, 2)
        (x, y) long. The image is mirrored beyond the tile (BORDER_REFLECT_101, as cv2.warpAffine
        in the exact path); the labels are 0 there."""
        n, m = len(draws.tile), self.crop
        corner = torch.floor(draws.centre).long() - m // 2
        steps = torch.arange(m, device=self.device)
        cols, rows = corner[:, 0, None] + steps, corner[:, 1, None] + steps  # (B, M)
        height, width = self.heights[draws.tile, None], self.widths[draws.tile, None]
        row_start = self.base[draws.tile, None] + _reflect101(rows, height) * width
        index = (row_start[:, :, None] + _reflect101(cols, width)[:, None]).to(self.store)
        row_inside, col_inside = ((rows >= 0) & (rows < height))[:, :, None], ((cols >= 0) & (cols < width))[:, None]
        # index_select, not pixels[index]: ~4x faster on the CPU (advanced indexing's general kernel)
        flat = index.view(-1)
        words = self.pixels.index_select(0, flat).view(n, m, m).to(self.device, non_blocking=True)
        channels = words.view(torch.uint8).reshape(n, m, m, 4)  # R, G, B, label bits
        bits = (channels[..., 3] * row_inside).mul_(col_inside)
        planes = [bits & 1, (bits >> 1) & 1, bits >> 2]  # fill, edge, vertex (the highest bit)
        labels = torch.stack(planes, 1).float()
        if self.owners is not None:
            owner = self.owners.index_select(0, flat).view(n, m, m).to(self.device, non_blocking=True)
            owner = (owner * row_inside).mul_(col_inside)
            labels = torch.cat([labels, owner[:, None].float()], 1)
        # all four channels at once: a contiguous conversion (a strided one of three is ~4x slower)
        return channels.float()[..., :3].permute(0, 3, 1, 2), labels, corner

    def render(self, draws: Draws) -> dict[str, torch.Tensor]:
        """The batch of ``draws``: float32 ``image``, ``polys``, ``disp``, ``seg``, ``polys_out`` on the device."""
        cfg = self.cfg
        n, size, out, margin, m = len(draws.tile), cfg.input_size, cfg.output_size, cfg.margin, self.crop
        rot = orthogonal(draws.angle, draws.flipped)
        image, labels, corner = self._crops(draws)
        # Patch pixel p at x = c + A (p - S/2) is, in affine_grid's units q (pixel centres (2i + 1) / S - 1),
        # c + (S / 2) A q: an affine map per patch, to the crop's and to the field grid's normalized units.
        # Relative to the crop x is under M px, so float32 holds it to ~1e-5 px (tile px up to ~1e4: ~1e-3).
        shape = [n, 1, size, size]
        local = 2.0 * (draws.centre - corner) / m - 1.0
        at_x = F.affine_grid(torch.cat([rot * (size / m), local[..., None]], 2).float(), shape, align_corners=False)
        # The same points in the field grid's units u = 2 (x - origin) / span - 1, an affine map of the
        # crop's: the field there is the target and moves the label sampling points.
        span = draws.field_span[:, None]
        shift = (2.0 * (corner - draws.field_origin) / span - 1.0 + m / span).float()[:, None, None]
        at_field = torch.addcmul(shift, at_x, (m / span).float()[:, None, None])
        field = F.grid_sample(draws.field, at_field, mode="bilinear", padding_mode="border", align_corners=False)
        target = field[:, :, margin : margin + out, margin : margin + out]
        vectors = torch.einsum("bihw,bij->bjhw", target, rot.float())  # A^T F: vectors in patch axes

        # The labels at the seg window (at x) and at the input raster (at x + F) in one grid; fill and
        # edge bilinearly, thresholded at 1/2 (sub-pixel boundaries); vertex (and owner) by nearest.
        points = torch.empty(n, 1, out * out + size * size, 2, device=self.device)
        points[:, 0, : out * out].view(n, out, out, 2).copy_(at_x[:, margin : margin + out, margin : margin + out])
        at_label = points[:, 0, out * out :].view(n, size, size, 2)
        torch.add(at_x, field.permute(0, 2, 3, 1), alpha=2.0 / m, out=at_label)  # x + F(x)
        smooth = F.grid_sample(labels[:, :2], points, mode="bilinear", padding_mode="zeros", align_corners=False)
        sharp = F.grid_sample(labels[:, 2:], points, mode="nearest", padding_mode="zeros", align_corners=False)
        sampled = torch.cat([smooth.ge_(0.5), sharp[:, :1]], 1)[:, :, 0]  # (B, 3, O*O + S*S), ge_ writes 0/1 floats
        seg3 = sampled[..., : out * out].reshape(n, 3, out, out)
        polys = sampled[..., out * out :].reshape(n, 3, size, size)
        if self.owners is not None and draws.keep is not None:
            owner = sharp[:, 1, 0, out * out :].long()
            polys = polys * torch.gather(draws.keep, 1, owner).reshape(n, 1, size, size)
        image = F.grid_sample(image, at_x, mode="bilinear", padding_mode="border", align_corners=False)
        seg = torch.cat([1.0 - seg3.amax(1, keepdim=True), seg3], 1)
        return {
            "image": jitter(image, draws.jitter).div_(127.5).sub_(1.0),  # not * (1 / 127.5): 255 -> 1 exactly
            "polys": polys,
            "disp": (vectors / cfg.max_displacement).clamp(-1.0, 1.0),
            "seg": seg,
            "polys_out": polys[:, :, margin : margin + out, margin : margin + out].contiguous(),
        }

    def draws_of(self, patches: Sequence[Patch]) -> Draws:
        """The draws of patches made by :class:`~cadalign.patches.PatchSampler` on the same tiles
        and settings (no jitter, every polygon kept): renders them for comparison."""
        dev, f64 = self.device, {"dtype": torch.float64, "device": self.device}
        fields = [p.field for p in patches]
        return Draws(
            tile=torch.tensor([self.tile_index.index(p.tile) for p in patches], device=dev),
            centre=torch.tensor([p.centre for p in patches], **f64),
            angle=torch.tensor([p.angle for p in patches], **f64),
            flipped=torch.tensor([p.flipped for p in patches], device=dev),
            field=torch.tensor(np.stack([f.grid for f in fields]), dtype=torch.float32, device=dev),
            field_origin=torch.tensor(np.stack([f.origin for f in fields]), **f64),
            field_span=torch.tensor([f.grid.shape[-1] / f.scale for f in fields], **f64),
            keep=None,
            jitter=torch.tensor([[0.0, 1.0, 1.0, 1.0]] * len(patches), device=dev),
        )


def jitter(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Photometric jitter of the exact path's albumentations pipeline on (B, 3, H, W) images in [0, 255].

    Brightness shift (``RandomBrightnessContrast``, by max), then ``ColorJitter``'s contrast
    (about the mean gray level) and saturation (towards each pixel's gray) in random order,
    each clipped to [0, 255]. ``params`` (B, 4): shift, contrast, saturation, contrast first.
    Overwrites ``image`` and returns it.
    """
    weights = torch.tensor(GRAY, dtype=image.dtype, device=image.device).reshape(1, 3, 1, 1)

    def blend(img: torch.Tensor, factor: torch.Tensor, about_mean: torch.Tensor) -> torch.Tensor:
        # contrast and saturation are one blend towards gray: its mean (contrast) or each pixel's
        gray = F.conv2d(img, weights)  # a 1 x 1 convolution: the fastest weighted channel sum
        towards = torch.where(about_mean, gray.mean((2, 3), keepdim=True), gray)
        return torch.lerp(towards, img, factor[:, None, None, None], out=img).clamp_(0.0, 255.0)

    image = image.add_(params[:, 0, None, None, None]).clamp_(0.0, 255.0)
    first = params[:, 3] > 0.5  # contrast first
    contrast, saturation = params[:, 1], params[:, 2]
    image = blend(image, torch.where(first, contrast, saturation), first[:, None, None, None])
    return blend(image, torch.where(first, saturation, contrast), ~first[:, None, None, None])
