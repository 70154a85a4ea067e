"""Tests of cadalign.similarity.density against brute-force pairwise computations in numpy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import torch

from cadalign.similarity.density import (
    all_neighbour_counts,
    nearest_neighbours,
    neighbour_counts,
    soft_counts_linear,
    uncertainty,
)


def _dataset(n: int, p: int, d: int, seed: int) -> torch.Tensor:
    """Gradients with a shared component, so that similarities spread over [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(1, p, d, generator=gen, dtype=torch.float64)
    scale = torch.rand(n, 1, 1, generator=gen, dtype=torch.float64) * 3
    return common * scale + torch.randn(n, p, d, generator=gen, dtype=torch.float64)


def _brute_kc(g: np.ndarray) -> np.ndarray:
    """(n, n) matrix of k^C = tr(C^-1/2 K C'^-1/2) / d via scipy, zero-gradient rows 0 / self 1."""
    n, _, d = g.shape
    r = []
    for i in range(n):
        c = g[i].T @ g[i]
        r.append(np.zeros((d, d)) if not c.any() else np.linalg.inv(scipy.linalg.sqrtm(c).real))
    k = np.array([[np.trace(r[i] @ g[i].T @ g[j] @ r[j]) / d for j in range(n)] for i in range(n)])
    for i in range(n):
        if not g[i].any():
            k[i, i] = 1.0
    return k


def _chunks(g: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(g.split(size))


def test_linear_soft_count_equals_pairwise_sum() -> None:
    g = _dataset(23, 7, 2, seed=0)
    brute = _brute_kc(g.numpy()).sum(1)
    linear = soft_counts_linear(_chunks(g, 5))
    np.testing.assert_allclose(linear.n_s.numpy(), brute, rtol=1e-5)
    assert not linear.degenerate.any()


def test_linear_soft_count_accepts_a_factory_and_refuses_a_generator() -> None:
    g = _dataset(10, 4, 2, seed=1)
    from_factory = soft_counts_linear(lambda: (c for c in g.split(3)))
    np.testing.assert_allclose(from_factory.n_s.numpy(), _brute_kc(g.numpy()).sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="fresh iterator"):
        soft_counts_linear(c for c in g.split(3))


def test_all_estimators_equal_brute_force() -> None:
    g = _dataset(19, 6, 2, seed=2)
    k = _brute_kc(g.numpy())
    counts = all_neighbour_counts(_chunks(g, 4), taus=(0.2, 0.5), alphas=(1.0, 2.5))
    np.testing.assert_allclose(counts["N_S"].numpy(), k.sum(1), rtol=1e-8)
    for tau in (0.2, 0.5):
        np.testing.assert_array_equal(counts[f"N_tau_{tau:g}"].numpy(), (k >= tau).sum(1))
    for alpha in (1.0, 2.5):
        expected = np.where(k > 0, np.clip(k, 0, None) ** alpha, 0).sum(1)
        np.testing.assert_allclose(counts[f"N_alpha_{alpha:g}"].numpy(), expected, rtol=1e-8)
    assert (k < 0).any() and (k > 0.5).sum() > 19  # the fixture exercises both signs


def test_zero_gradient_sample(caplog: pytest.LogCaptureFixture) -> None:
    g = _dataset(9, 5, 2, seed=3)
    g[4] = 0
    k = _brute_kc(g.numpy())
    with caplog.at_level(logging.WARNING, logger="cadalign.similarity.kernels"):
        linear = soft_counts_linear(_chunks(g, 4))
        pairwise = all_neighbour_counts(_chunks(g, 4), taus=(0.9,), alphas=(2.0,))
    assert "zero output gradient" in caplog.text
    assert linear.degenerate.tolist() == [i == 4 for i in range(9)]
    assert linear.n_s[4].item() == 1.0  # only itself
    np.testing.assert_allclose(linear.n_s.numpy(), k.sum(1), rtol=1e-8)
    for values in pairwise.values():
        assert torch.isfinite(values).all()
    np.testing.assert_allclose(pairwise["N_S"].numpy(), k.sum(1), rtol=1e-8)
    assert pairwise["N_tau_0.9"][4].item() == 1


def test_streaming_knn_and_histogram_equal_brute_force() -> None:
    g = _dataset(31, 6, 2, seed=4)
    k = _brute_kc(g.numpy())
    query_idx = torch.tensor([0, 7, 30])
    result = nearest_neighbours(g[query_idx], _chunks(g, 6), k=5, query_indices=query_idx, bins=10)
    for row, qi in enumerate(query_idx.tolist()):
        others = np.delete(np.arange(31), qi)
        sims = k[qi, others]
        order = np.argsort(-sims, kind="stable")[:5]
        np.testing.assert_array_equal(result.indices[row].numpy(), others[order])
        np.testing.assert_allclose(result.values[row].numpy(), sims[order], rtol=1e-9)
        hist, _ = np.histogram(sims, bins=10, range=(0.0, 1.0))
        np.testing.assert_array_equal(result.hist[row].numpy(), hist)
        assert result.below[row].item() == (sims < 0).sum()
        assert result.hist[row].sum() + result.below[row] + result.above[row] == 30


def test_knn_without_query_indices_includes_everything() -> None:
    g = _dataset(12, 4, 2, seed=5)
    result = nearest_neighbours(g[:2], _chunks(g, 5), k=3)
    assert result.indices[:, 0].tolist() == [0, 1]  # each query finds itself first
    assert (result.hist.sum(1) + result.below + result.above).tolist() == [12, 12]


def test_neighbour_counts_rejects_bad_arguments() -> None:
    g = _dataset(4, 3, 2, seed=6)
    with pytest.raises(ValueError, match="alphas must be > 0"):
        neighbour_counts(g, _chunks(g, 2), alphas=(0.0,))
    with pytest.raises(ValueError, match="query_indices"):
        neighbour_counts(g, _chunks(g, 2), query_indices=torch.arange(3))
    with pytest.raises(ValueError, match=r"\(b, p, d\)"):
        soft_counts_linear([torch.zeros(3, 4)])


def test_uncertainty_equals_brute_force(caplog: pytest.LogCaptureFixture) -> None:
    g = _dataset(11, 5, 2, seed=7)
    g[3] = 0
    flat = g.reshape(11, -1).numpy()
    inner = flat @ flat.T  # k^I(x, x') = <G(x), G(x')>_F
    with caplog.at_level(logging.WARNING, logger="cadalign.similarity.density"):
        u = uncertainty(_chunks(g, 4)).numpy()
    keep = np.arange(11) != 3
    expected = np.diag(inner)[keep] / inner.sum(1)[keep]
    np.testing.assert_allclose(u[keep], expected, rtol=1e-10)
    assert u[3] == 0.0 and "zero-gradient" in caplog.text
