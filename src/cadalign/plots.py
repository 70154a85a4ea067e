"""Figures of the study (matplotlib, Agg): accuracy curves and polygon overlays."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import shapely  # noqa: E402

from cadalign.atomic import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)

# Input red, then the rounds blue, green, ... as in the reference figures; truth in white.
ROUND_COLOURS = ("red", "blue", "lime", "orange", "magenta", "cyan")


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_accuracy_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """One chart with the accuracy curve (fraction of vertices within tau px) of each label set."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, (taus, acc)) in enumerate(curves.items()):
        ax.plot(taus, acc, label=name, color=ROUND_COLOURS[i % len(ROUND_COLOURS)])
    ax.set_xlabel("threshold tau (px)")
    ax.set_ylabel("fraction of vertices with error <= tau")
    ax.set_xlim(0, max(t[-1] for t, _ in curves.values()) if curves else 32)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def _rings(geom: shapely.Geometry) -> list[np.ndarray]:
    polys = geom.geoms if isinstance(geom, shapely.MultiPolygon) else [geom]
    out = []
    for poly in polys:
        out.append(np.asarray(poly.exterior.coords))
        out.extend(np.asarray(r.coords) for r in poly.interiors)
    return out


def plot_overlay(
    image: np.ndarray,
    layers: Mapping[str, np.ndarray],
    path: str | Path,
    window: tuple[int, int, int, int] | None = None,
    colours: Mapping[str, str] | None = None,
) -> Path:
    """Draw polygon layers (pixel coordinates) over an RGB image crop.

    Args:
        image: (H, W, 3) uint8 image.
        layers: name -> array of shapely polygons in pixel coordinates, drawn in order.
        path: output PNG.
        window: (x0, y0, width, height) crop; the whole image if None.
        colours: name -> matplotlib colour; defaults to ROUND_COLOURS in order.
    """
    x0, y0, w, h = window or (0, 0, image.shape[1], image.shape[0])
    crop = image[y0 : y0 + h, x0 : x0 + w]
    fig, ax = plt.subplots(figsize=(7, 7 * h / max(w, 1)))
    ax.imshow(crop, extent=(x0, x0 + crop.shape[1], y0 + crop.shape[0], y0))
    box = shapely.box(x0, y0, x0 + w, y0 + h)
    for i, (name, geoms) in enumerate(layers.items()):
        colour = (colours or {}).get(name, ROUND_COLOURS[i % len(ROUND_COLOURS)])
        first = True
        for geom in np.asarray(geoms, dtype=object):
            if geom is None or geom.is_empty or not geom.intersects(box):
                continue
            for ring in _rings(geom):
                ax.plot(ring[:, 0], ring[:, 1], color=colour, linewidth=1.2, label=name if first else None)
                first = False
    ax.set_xlim(x0, x0 + w)
    ax.set_ylim(y0 + h, y0)
    ax.set_axis_off()
    ax.legend(loc="upper right", fontsize=8, framealpha=0.7)
    return save_figure(fig, path)
