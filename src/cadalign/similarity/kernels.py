"""Similarity kernels between per-sample output gradients (Charpiat et al., NeurIPS 2019).

Notation (paper section 3): ``G(x)`` is the ``p x d`` matrix of gradients of the network
output ``f(x)`` (``d`` components) with respect to ``p`` parameters.

- ``K(x, x') = G(x)^T G(x')`` (``d x d``), ``C(x) = K(x, x)``;
- ``K^C(x, x') = C(x)^{-1/2} K(x, x') C(x')^{-1/2}`` (paper eq. 4, whose second factor is
  printed as ``K(x', x)^{-1/2}``; the symmetric normalisation needs ``C(x')``);
- ``k^C = tr(K^C) / d`` (eq. 5) and, for ``d = 2``, the rotation-invariant
  ``k^{C,rot} = 1/2 sqrt(||K^C||_F^2 + 2 det K^C)`` (section 3, "Metrics on output"): the
  similarity after the rotation of the output plane that best aligns the two moves,
  ``max_R tr(K^C R) / 2`` over rotations ``R``.

Because ``C^{-1/2}`` is symmetric, ``K^C(x, x') = A(x)^T A(x')`` with the *whitened*
gradients ``A(x) = G(x) C(x)^{-1/2}``; everything below goes through :func:`whiten` so that
pairwise and linear-time (:mod:`cadalign.similarity.density`) computations agree exactly.

Inverse square root: ``C = U diag(l) U^T`` by ``torch.linalg.eigh``; eigenvalues are
clamped from below at ``rel_floor * max(l)`` before ``l^{-1/2}``. With the default
``rel_floor = 1e-6`` a full-rank ``C`` is inverted exactly up to rounding (so
``K^C(x, x) = I``), while a rank-deficient ``C`` (e.g. two parallel output gradients) gives
a finite, bounded result instead of a division by ~0; its self-similarity is then ``I`` on
the range of ``C`` and ~0 elsewhere. In float32, ``C`` itself carries a relative rounding
error of ~1e-7 of ``max(l)``, hence a floor not much below 1e-6.

Zero gradient: if ``max(l) <= finfo.tiny`` (``G(x) = 0``: the output does not depend on the
parameters at ``x``), ``C(x)^{-1/2}`` is defined as 0, so ``K^C(x, x') = 0`` and
``k^C(x, x') = 0`` for every other ``x'``; a warning is logged with the number of such
samples. Self-similarity of such a sample is defined as 1 by the callers that know which
pair is a self-pair (:mod:`cadalign.similarity.density`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_REL_FLOOR = 1e-6  # eigenvalue floor relative to the largest eigenvalue of C(x)


def _check_grads(g: Tensor, name: str) -> None:
    if g.ndim < 2:
        raise ValueError(f"{name} must have shape (..., p, d), got {tuple(g.shape)}")


def gram(ga: Tensor, gb: Tensor) -> Tensor:
    """Kernel matrices ``K = Ga^T Gb`` batched over pairs.

    Args:
        ga: Gradients ``(..., p, d)``.
        gb: Gradients ``(..., p, d)``, leading dimensions broadcast with ``ga``.

    Returns:
        ``(..., d, d)`` tensor ``K[..., i, j] = <ga[..., :, i], gb[..., :, j]>``.

    Raises:
        ValueError: if the shapes do not end in matching ``(p, d)``.
    """
    _check_grads(ga, "ga")
    _check_grads(gb, "gb")
    if ga.shape[-2:] != gb.shape[-2:]:
        raise ValueError(f"gradient shapes differ: {tuple(ga.shape)} vs {tuple(gb.shape)}")
    return ga.transpose(-1, -2) @ gb


def inv_sqrt_psd(c: Tensor, rel_floor: float = DEFAULT_REL_FLOOR) -> tuple[Tensor, Tensor]:
    """Symmetric inverse square root of positive semi-definite matrices, floored.

    Args:
        c: Symmetric PSD matrices ``(..., d, d)``.
        rel_floor: Eigenvalues below ``rel_floor * max eigenvalue`` are raised to it.

    Returns:
        ``(r, degenerate)``: ``r`` ``(..., d, d)`` with ``r c r ~ I`` for full-rank ``c``;
        ``degenerate`` ``(...)`` bool, True where ``c`` is (numerically) zero, in which
        case ``r`` is 0.

    Raises:
        ValueError: if ``c`` is not square or ``rel_floor`` is not in (0, 1).
    """
    if c.ndim < 2 or c.shape[-1] != c.shape[-2]:
        raise ValueError(f"c must have shape (..., d, d), got {tuple(c.shape)}")
    if not 0.0 < rel_floor < 1.0:
        raise ValueError(f"rel_floor must be in (0, 1), got {rel_floor}")
    sym = 0.5 * (c + c.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(sym)
    lam_max = evals[..., -1]
    degenerate = lam_max <= torch.finfo(c.dtype).tiny
    floor = (rel_floor * lam_max).clamp_min(torch.finfo(c.dtype).tiny)
    inv = evals.clamp_min(0).maximum(floor.unsqueeze(-1)).rsqrt()
    inv = torch.where(degenerate.unsqueeze(-1), torch.zeros_like(inv), inv)
    r = (evecs * inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return r, degenerate


def whitening(g: Tensor, rel_floor: float = DEFAULT_REL_FLOOR, warn: bool = True) -> tuple[Tensor, Tensor]:
    """Per-sample ``C(x)^{-1/2}``; logs a warning when some samples have a zero gradient.

    ``C`` is formed in the dtype of ``g`` and inverted in float64.

    Args:
        g: Per-sample gradients ``(B, p, d)`` (or any ``(..., p, d)``).
        rel_floor: See :func:`inv_sqrt_psd`.
        warn: Log the zero-gradient warning (callers that revisit the same samples
            pass False after the first visit).

    Returns:
        ``(r, degenerate)``: ``r`` ``(B, d, d)`` float64 (0 for a zero gradient);
        ``degenerate`` ``(B,)`` bool.

    Raises:
        ValueError: if ``g`` has fewer than 2 dimensions.
    """
    _check_grads(g, "g")
    r, degenerate = inv_sqrt_psd(gram(g, g).double(), rel_floor)
    n_bad = int(degenerate.sum())
    if n_bad and warn:
        logger.warning(
            "%d of %d samples have a zero output gradient: their k^C to every other sample "
            "is set to 0 (and to themselves to 1)",
            n_bad,
            degenerate.numel(),
        )
    return r, degenerate


def whiten(g: Tensor, rel_floor: float = DEFAULT_REL_FLOOR, warn: bool = True) -> tuple[Tensor, Tensor]:
    """Whitened gradients ``A = G C^{-1/2}``, so that ``K^C(x, x') = A(x)^T A(x')``.

    Args:
        g: Per-sample gradients ``(B, p, d)`` (or any ``(..., p, d)``).
        rel_floor: See :func:`inv_sqrt_psd`.
        warn: See :func:`whitening`.

    Returns:
        ``(a, degenerate)``: ``a`` like ``g`` (same dtype; zero for a zero gradient);
        ``degenerate`` ``(B,)`` bool.

    Raises:
        ValueError: if ``g`` has fewer than 2 dimensions.
    """
    r, degenerate = whitening(g, rel_floor, warn)
    return g @ r.to(g.dtype), degenerate


def normalized_kernel(ga: Tensor, gb: Tensor, rel_floor: float = DEFAULT_REL_FLOOR) -> Tensor:
    """``K^C(x, x')`` for paired gradients.

    A pair where either gradient is zero gets the zero matrix (the pair is treated as two
    distinct samples; see the module docstring for self-pairs).

    Args:
        ga: ``G(x)``, ``(..., p, d)``.
        gb: ``G(x')``, ``(..., p, d)``, broadcasting with ``ga``.
        rel_floor: See :func:`inv_sqrt_psd`.

    Returns:
        ``(..., d, d)`` normalised kernel matrices.
    """
    aa, _ = whiten(ga, rel_floor)
    ab, _ = whiten(gb, rel_floor)
    return gram(aa, ab)


def cross_kernel(aq: Tensor, ad: Tensor) -> Tensor:
    """All-pairs ``K^C`` between two sets of whitened gradients, as one matrix product.

    Args:
        aq: Whitened gradients ``(Q, p, d)`` (from :func:`whiten`).
        ad: Whitened gradients ``(N, p, d)``.

    Returns:
        ``(Q, N, d, d)`` with ``out[q, n] = aq[q]^T ad[n]``.

    Raises:
        ValueError: if the ``(p, d)`` shapes differ.
    """
    if aq.ndim != 3 or ad.ndim != 3 or aq.shape[1:] != ad.shape[1:]:
        raise ValueError(f"expected (Q, p, d) and (N, p, d), got {tuple(aq.shape)}, {tuple(ad.shape)}")
    q, p, d = aq.shape
    n = ad.shape[0]
    flat_q = aq.transpose(1, 2).reshape(q * d, p)
    flat_d = ad.transpose(1, 2).reshape(n * d, p)
    return (flat_q @ flat_d.T).reshape(q, d, n, d).permute(0, 2, 1, 3)


def k_trace(kc: Tensor) -> Tensor:
    """Scalar similarity ``k^C = tr(K^C) / d`` (paper eq. 5), in [-1, 1].

    Args:
        kc: ``(..., d, d)`` normalised kernel matrices.

    Returns:
        ``(...)`` tensor.
    """
    return torch.diagonal(kc, dim1=-2, dim2=-1).sum(-1) / kc.shape[-1]


def k_rot(kc: Tensor) -> Tensor:
    """Rotation-invariant similarity for ``d = 2``: ``1/2 sqrt(||K^C||_F^2 + 2 det K^C)``.

    The paper's closed form of ``max_theta tr(K^C R_theta) / 2`` over rotations ``R_theta``
    of the output plane: with ``M = K^C``, ``tr(M R_theta) = (M11 + M22) cos theta +
    (M12 - M21) sin theta``, whose maximum is ``sqrt((M11 + M22)^2 + (M12 - M21)^2)``. It is
    computed in that form, a sum of squares (never negative, so no NaN from rounding; 0 for
    the zero matrix of a zero gradient). It is invariant to ``K^C -> K^C R`` and
    ``K^C -> R K^C`` for rotations ``R``, at least ``k^C`` and 1 for ``K^C = I``.

    Args:
        kc: ``(..., 2, 2)`` normalised kernel matrices.

    Returns:
        ``(...)`` tensor in [0, 1].

    Raises:
        ValueError: if ``d != 2``.
    """
    if kc.shape[-2:] != (2, 2):
        raise ValueError(f"k_rot needs d = 2 (2 x 2 matrices), got {tuple(kc.shape[-2:])}")
    m11, m12 = kc[..., 0, 0], kc[..., 0, 1]
    m21, m22 = kc[..., 1, 0], kc[..., 1, 1]
    return 0.5 * torch.sqrt((m11 + m22) ** 2 + (m12 - m21) ** 2)
