"""Tests of cadalign.similarity.kernels against independent (numpy/scipy) computations."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from cadalign.similarity.kernels import (
    cross_kernel,
    gram,
    inv_sqrt_psd,
    k_rot,
    k_trace,
    normalized_kernel,
    whiten,
)


def _grads(n: int, p: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, p, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kc_numpy(ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """K^C with scipy's matrix square root (no eigenvalue floor)."""
    ca, cb = ga.T @ ga, gb.T @ gb
    ra = np.linalg.inv(scipy.linalg.sqrtm(ca).real)
    rb = np.linalg.inv(scipy.linalg.sqrtm(cb).real)
    return ra @ ga.T @ gb @ rb


def test_inv_sqrt_matches_scipy_and_inverts() -> None:
    g = _grads(4, 9, 3, seed=0)
    c = gram(g, g)
    r, degenerate = inv_sqrt_psd(c)
    assert not degenerate.any()
    for i in range(4):
        expected = np.linalg.inv(scipy.linalg.sqrtm(c[i].numpy()).real)
        np.testing.assert_allclose(r[i].numpy(), expected, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose((r[i] @ c[i] @ r[i]).numpy(), np.eye(3), atol=1e-10)


def test_self_similarity_is_identity() -> None:
    g = _grads(6, 11, 2, seed=1)
    kc = normalized_kernel(g, g)
    np.testing.assert_allclose(kc.numpy(), np.broadcast_to(np.eye(2), (6, 2, 2)), atol=1e-10)
    np.testing.assert_allclose(k_trace(kc).numpy(), np.ones(6), atol=1e-12)


def test_matches_scipy_and_transpose_symmetry() -> None:
    ga, gb = _grads(5, 13, 2, seed=2), _grads(5, 13, 2, seed=3)
    kab = normalized_kernel(ga, gb)
    kba = normalized_kernel(gb, ga)
    np.testing.assert_allclose(kba.numpy(), kab.transpose(1, 2).numpy(), atol=1e-12)
    for i in range(5):
        np.testing.assert_allclose(kab[i].numpy(), _kc_numpy(ga[i].numpy(), gb[i].numpy()), atol=1e-9)


def test_bounds_of_entries_and_scalars() -> None:
    g = _grads(40, 5, 2, seed=4)
    a, _ = whiten(g)
    kc = cross_kernel(a, a)  # (40, 40, 2, 2), includes strongly correlated and opposite pairs
    assert kc.abs().max() <= 1 + 1e-12
    assert k_trace(kc).abs().max() <= 1 + 1e-12
    rot = k_rot(kc)
    assert rot.min() >= 0 and rot.max() <= 1 + 1e-12
    assert (rot >= k_trace(kc) - 1e-12).all()  # the best rotation includes the identity


def test_cross_kernel_equals_pairwise() -> None:
    gq, gd = _grads(3, 7, 2, seed=5), _grads(4, 7, 2, seed=6)
    aq, _ = whiten(gq)
    ad, _ = whiten(gd)
    full = cross_kernel(aq, ad)
    for q in range(3):
        for n in range(4):
            np.testing.assert_allclose(full[q, n].numpy(), _kc_numpy(gq[q].numpy(), gd[n].numpy()), atol=1e-9)


def test_scalar_output_is_cosine() -> None:
    ga, gb = _grads(8, 10, 1, seed=7), _grads(8, 10, 1, seed=8)
    k = k_trace(normalized_kernel(ga, gb)).numpy()
    a, b = ga[..., 0].numpy(), gb[..., 0].numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(k, cos, atol=1e-12)


def test_k_rot_formula_and_rotation_invariance() -> None:
    ga, gb = _grads(10, 6, 2, seed=9), _grads(10, 6, 2, seed=10)
    kc = normalized_kernel(ga, gb)
    m = kc.numpy()
    expected = 0.5 * np.sqrt((m**2).sum((1, 2)) + 2 * np.linalg.det(m))
    np.testing.assert_allclose(k_rot(kc).numpy(), expected, atol=1e-12)
    theta = 0.7
    cos, sin = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    rotated = normalized_kernel(ga, gb @ rot)  # the second output rotated: G' -> G' R
    np.testing.assert_allclose(k_rot(rotated).numpy(), k_rot(kc).numpy(), atol=1e-12)
    assert not torch.allclose(k_trace(rotated), k_trace(kc))  # the plain k^C does change


def test_k_rot_requires_two_outputs() -> None:
    with pytest.raises(ValueError, match="d = 2"):
        k_rot(torch.eye(3).expand(2, 3, 3))


def test_zero_gradient_warns_and_stays_finite(caplog: pytest.LogCaptureFixture) -> None:
    g = _grads(3, 8, 2, seed=11)
    g[1] = 0
    with caplog.at_level(logging.WARNING, logger="cadalign.similarity.kernels"):
        a, degenerate = whiten(g)
    assert "zero output gradient" in caplog.text
    assert degenerate.tolist() == [False, True, False]
    kc = cross_kernel(a, a)
    assert torch.isfinite(kc).all()
    assert torch.all(kc[1] == 0) and torch.all(kc[:, 1] == 0)


def test_rank_deficient_is_finite_and_bounded() -> None:
    g = _grads(2, 8, 1, seed=12).repeat(1, 1, 2)  # both outputs share one gradient: C has rank 1
    kc = normalized_kernel(g, g)
    assert torch.isfinite(kc).all()
    assert kc.abs().max() <= 1 + 1e-6


def test_inv_sqrt_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rel_floor"):
        inv_sqrt_psd(torch.eye(2), rel_floor=0.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., d, d\)"):
        inv_sqrt_psd(torch.ones(2, 3))
