"""Tests of cadalign.similarity.density against brute-force pairwise computations in numpy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from cadalign.similarity.density import (
    all_neighbour_counts,
    count_keys,
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


def _brute_kernels(g: np.ndarray) -> np.ndarray:
    """(n, n, d, d) K^C = C^-1/2 K C'^-1/2 via scipy's sqrtm; 0 for a zero gradient."""
    n, _, d = g.shape
    r = []
    for i in range(n):
        c = g[i].T @ g[i]
        r.append(np.zeros((d, d)) if not c.any() else np.linalg.inv(scipy.linalg.sqrtm(c).real))
    return np.array([[r[i] @ g[i].T @ g[j] @ r[j] for j in range(n)] for i in range(n)])


def _self_one(k: np.ndarray, g: np.ndarray) -> np.ndarray:
    for i in range(len(g)):
        if not g[i].any():
            k[i, i] = 1.0  # a zero-gradient sample is similar to itself only
    return k


def _brute_kc(g: np.ndarray) -> np.ndarray:
    """(n, n) matrix of k^C = tr(C^-1/2 K C'^-1/2) / d via scipy, zero-gradient rows 0 / self 1."""
    kc = _brute_kernels(g)
    return _self_one(np.trace(kc, axis1=2, axis2=3) / g.shape[2], g)


def _best_rotation(m: np.ndarray) -> float:
    """max over rotations R of tr(M R) / 2, by a grid of angles refined with a bounded search."""

    def minus_trace(theta: float) -> float:
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        return -np.trace(m @ rot) / 2

    grid = np.linspace(-np.pi, np.pi, 3601)
    c, s = np.cos(grid), np.sin(grid)
    rots = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (angles, 2, 2)
    start = grid[np.argmax(np.einsum("ij,tji->t", m, rots))]
    step = grid[1] - grid[0]
    best = scipy.optimize.minimize_scalar(
        minus_trace, bounds=(start - step, start + step), method="bounded", options={"xatol": 1e-12}
    )
    return -float(best.fun)


def _brute_krot(g: np.ndarray) -> np.ndarray:
    """(n, n) rotation-invariant k^C: K^C aligned by the best rotation of the output plane."""
    kc = _brute_kernels(g)
    n = len(g)
    return _self_one(np.array([[_best_rotation(kc[i, j]) for j in range(n)] for i in range(n)]), g)


def _chunks(g: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(g.split(size))


def test_linear_soft_count_equals_pairwise_sum() -> None:
    g = _dataset(23, 7, 2, seed=0)
    brute = _brute_kc(g.numpy()).sum(1)
    linear = soft_counts_linear(_chunks(g, 5))
    np.testing.assert_allclose(linear.n_s.numpy(), brute, rtol=1e-5)
    assert not linear.degenerate.any()


def test_linear_soft_count_of_float32_gradients_equals_the_pairwise_one() -> None:
    """Both accumulate in float64 from the same float32 gradients: equal to float64 rounding."""
    g = _dataset(40, 300, 2, seed=8).float() * 1e-3
    linear = soft_counts_linear(_chunks(g, 16)).n_s
    pairwise = all_neighbour_counts(_chunks(g, 16))["N_S"]
    assert linear.dtype == pairwise.dtype == torch.float64
    np.testing.assert_allclose(linear.numpy(), pairwise.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(linear.numpy(), _brute_kc(g.double().numpy()).sum(1), rtol=0, atol=1e-9)


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


def test_rotation_invariant_counts_equal_brute_force() -> None:
    g = _dataset(13, 5, 2, seed=9)
    k = _brute_krot(g.numpy())
    counts = all_neighbour_counts(_chunks(g, 4), taus=(0.3, 0.7), alphas=(1.0, 3.0))
    assert counts.keys() == set(count_keys((0.3, 0.7), (1.0, 3.0), rot=True))
    np.testing.assert_allclose(counts["N_S_rot"].numpy(), k.sum(1), rtol=1e-9)
    for tau in (0.3, 0.7):
        np.testing.assert_array_equal(counts[f"N_tau_rot_{tau:g}"].numpy(), (k >= tau).sum(1))
    for alpha in (1.0, 3.0):
        np.testing.assert_allclose(counts[f"N_alpha_rot_{alpha:g}"].numpy(), (k**alpha).sum(1), rtol=1e-9)
    plain = _brute_kc(g.numpy())
    assert np.all(k >= plain - 1e-12) and (k > plain + 0.1).any()  # the best rotation only adds
    assert ((k > 0.3) & (k < 0.7)).any() and (k < 0.3).any()  # the thresholds split the fixture


def test_rotation_invariant_counts_need_two_outputs() -> None:
    g = _dataset(5, 4, 3, seed=10)
    assert "N_S_rot" not in all_neighbour_counts(_chunks(g, 2))  # auto: only for d = 2
    with pytest.raises(ValueError, match="d = 2"):
        all_neighbour_counts(_chunks(g, 2), rot=True)


@pytest.mark.parametrize(
    ("taus", "alphas", "message"),
    [
        ((0.5, 0.9, 0.5), (1.0,), r"taus has 0\.5 twice"),
        ((0.9,), (2.0, 2.0000001), r"alphas has 2\.0 and 2\.0000001, equal to 6 digits .*N_alpha_2\)"),
    ],
)
def test_repeated_levels_are_refused(taus: tuple[float, ...], alphas: tuple[float, ...], message: str) -> None:
    g = _dataset(4, 3, 2, seed=11)
    with pytest.raises(ValueError, match=message):
        count_keys(taus, alphas)
    with pytest.raises(ValueError, match=message):
        all_neighbour_counts(_chunks(g, 2), taus=taus, alphas=alphas)


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
    np.testing.assert_allclose(pairwise["N_S_rot"].numpy(), _brute_krot(g.numpy()).sum(1), rtol=1e-8)
    assert pairwise["N_S_rot"][4].item() == 1.0 and pairwise["N_tau_rot_0.9"][4].item() == 1


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
