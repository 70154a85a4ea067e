"""Tests of the per-round analysis core against brute-force computations on tiny models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from cadalign.model import AlignNet, ModelConfig
from cadalign.similarity import analysis
from cadalign.similarity.grads import alignment_output_fn, per_sample_grads_loop
from cadalign.similarity.kernels import k_rot, k_trace, normalized_kernel

TINY = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)
SIZE = 30  # valid input of the 2-level net: output 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_net(seed: int) -> AlignNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AlignNet(TINY).eval()


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 2 - 1
    polys = (torch.rand(n, 3, SIZE, SIZE, generator=gen) > 0.7).float()
    return image, polys


def _brute_kc(model: nn.Module, inputs: tuple[torch.Tensor, ...], output: str, rot: bool = False) -> np.ndarray:
    """All-pairs k^C (or k^{C,rot}) from the per-sample loop and the pairwise normalised kernel."""
    g = per_sample_grads_loop(model, model.disp_parameters(), inputs, alignment_output_fn(output)).double()
    return (k_rot if rot else k_trace)(normalized_kernel(g[:, None], g[None, :])).numpy()


def test_choose_queries(caplog: pytest.LogCaptureFixture) -> None:
    q = analysis.choose_queries(50, 20, 0)
    assert len(q) == 20 and len(set(q.tolist())) == 20 and np.all(np.diff(q) > 0) and q.max() < 50
    np.testing.assert_array_equal(q, analysis.choose_queries(50, 20, 0))
    with caplog.at_level(logging.WARNING, logger="cadalign.similarity.analysis"):
        assert analysis.choose_queries(5, 20, 0).tolist() == [0, 1, 2, 3, 4]
    assert "all of them are queries" in caplog.text


def test_nearest_valid_input_size() -> None:
    def valid(s: int) -> bool:
        return s % 4 == 0

    assert analysis.nearest_valid_input_size(valid, 124) == 124
    assert analysis.nearest_valid_input_size(valid, 122) == 120  # tie: the smaller
    assert analysis.nearest_valid_input_size(valid, 123) == 124
    with pytest.raises(ValueError, match="no valid network input size"):
        analysis.nearest_valid_input_size(lambda s: False, 50, search=3)
    net = _tiny_net(0)  # valid inputs: even sizes >= 26
    assert analysis.nearest_network_input_size(net, 31) == 30
    assert net.output_size(analysis.nearest_network_input_size(net, 7)) >= 1


@pytest.mark.parametrize("output", ["sum", "center"])
@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])
def test_analyse_equals_brute_force(output: str, cache_bytes: int) -> None:
    model = _tiny_net(0)
    inputs = _inputs(9, 1)
    queries = np.array([0, 4, 8])
    res = analysis.analyse(
        model, model.disp_parameters(), inputs, alignment_output_fn(output), queries,
        k=3, bins=10, taus=(0.5,), alphas=(2.0,), chunk_size=4, cache_bytes=cache_bytes,
    )
    kc = _brute_kc(model, inputs, output)
    np.testing.assert_allclose(np.diag(kc), 1.0, atol=1e-6)  # k^C(x, x) = 1
    np.testing.assert_allclose(res.n_s, kc.sum(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.counts["N_S"], kc.sum(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.n_s, res.counts["N_S"], rtol=0, atol=1e-10)  # same gradients, float64
    krot = _brute_kc(model, inputs, output, rot=True)
    np.testing.assert_allclose(res.counts["N_S_rot"], krot.sum(1), rtol=1e-4, atol=1e-4)
    want_alpha = (np.clip(kc, 0, None) ** 2).sum(1)
    np.testing.assert_allclose(res.counts["N_alpha_2"], want_alpha, rtol=1e-4, atol=1e-4)
    far = np.abs(kc - 0.5) > 1e-4  # decisions away from the threshold only
    assert np.all((res.counts["N_tau_0.5"] == (kc >= 0.5).sum(1)) | ~far.all(1))
    for row, q in enumerate(queries):
        others = np.delete(np.arange(9), q)
        order = others[np.argsort(-kc[q, others])][:3]
        assert q not in res.knn.indices[row].tolist()  # neighbours exclude self
        np.testing.assert_allclose(res.knn.values[row].numpy(), kc[q, order], atol=1e-5)
        inside = (kc[q, others] >= 0) & (kc[q, others] <= 1)
        want_hist = np.histogram(np.clip(kc[q, others][inside], 0, 1), bins=10, range=(0, 1))[0]
        assert res.knn.hist[row].sum() == inside.sum()
        assert np.abs(res.knn.hist[row].numpy() - want_hist).sum() <= 2  # bin-edge rounding only
    if cache_bytes:
        assert res.timings["gradient_passes"] == 1
    else:
        assert res.timings["gradient_passes"] > 2  # recomputed per pass


class _DeadForZero(nn.Module):
    """(B, 2) output with zero parameter gradient for an all-zero input (ReLU below 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 0.5, -0.2], [0.3, -1.0, 0.8]]))
            self.lin.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def test_zero_gradient_patch_warns_and_stays_finite(caplog: pytest.LogCaptureFixture) -> None:
    model = _DeadForZero()
    x = torch.tensor([[0.0, 0.0, 0.0], [5.0, 1.0, 2.0], [4.0, -3.0, 1.0], [6.0, -2.0, 5.0]])
    with caplog.at_level(logging.WARNING):
        params = list(model.named_parameters())
        res = analysis.analyse(model, params, (x,), lambda y: y, np.array([0, 1]), k=2, bins=10)
    assert "zero output gradient" in caplog.text
    assert res.degenerate.tolist() == [True, False, False, False]
    assert res.n_s[0] == pytest.approx(1.0)  # itself only
    assert all(np.all(np.isfinite(v)) for v in [res.n_s, *res.counts.values()])
    assert res.counts["N_S_rot"][0] == 1.0 and res.counts["N_tau_rot_0.9"][0] == 1  # itself only
    assert res.knn.values[0].tolist() == [0.0, 0.0]  # a zero-gradient query: k^C 0 to the others
    m = analysis.summary_metrics(res)
    assert m["n_zero_gradient"] == 1 and all(np.isfinite(v) for v in m.values())


def test_ns_histogram_and_summary() -> None:
    rng = np.random.default_rng(2)
    n_s = rng.uniform(1, 30, 57)
    counts, edges, examples = analysis.ns_histogram(n_s, 10)
    want, want_edges = np.histogram(n_s, bins=10)
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_allclose(edges, want_edges)
    for b, i in enumerate(examples):
        if counts[b] == 0:
            assert i == -1
        else:
            assert edges[b] <= n_s[i] <= edges[b + 1]
    with pytest.raises(ValueError, match="at least one value"):
        analysis.ns_histogram(np.array([]), 10)


def test_summary_metrics_against_numpy() -> None:
    model = _tiny_net(1)
    inputs = _inputs(6, 3)
    out_fn = alignment_output_fn("center")
    res = analysis.analyse(model, model.disp_parameters(), inputs, out_fn, np.array([1, 2]), k=2, bins=100)
    m = analysis.summary_metrics(res, threshold=0.9)
    assert m["n_patches"] == 6 and m["n_queries"] == 2
    assert m["N_S_median"] == pytest.approx(np.median(res.n_s))
    assert m["N_S_q90"] == pytest.approx(np.percentile(res.n_s, 90))
    vals = res.knn.values.numpy()
    assert m["knn_frac_above"] == pytest.approx((vals >= 0.9).mean())
    kc = _brute_kc(model, inputs, "center")
    frac = [np.mean(np.delete(kc[q], q) >= 0.9) for q in (1, 2)]
    assert m["query_frac_above"] == pytest.approx(np.mean(frac), abs=0.21)  # bin resolution, 5 others
    assert m["ns_pairwise_max_abs_diff"] < 1e-10
    assert m["N_S_rot_median"] == pytest.approx(np.median(res.counts["N_S_rot"]))
    assert m["N_S_rot_mean"] >= m["N_S_mean"]  # k^{C,rot} >= k^C pair by pair


def test_ns_histogram_of_counts_equal_up_to_rounding() -> None:
    """Every patch with the same N_S up to the last bits (numpy refuses bins on such a range) lands
    in the middle bin of a unit range."""
    n_s = np.array([3.0, np.nextafter(3.0, 4.0), 3.0, np.nextafter(3.0, 2.0)])
    counts, edges, examples = analysis.ns_histogram(n_s, 10)
    assert counts.sum() == 4 and counts[5] == 4
    assert edges[0] == pytest.approx(2.45) and edges[-1] == pytest.approx(3.45)
    assert examples[5] in range(4) and (examples[np.arange(10) != 5] == -1).all()
