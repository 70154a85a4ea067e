"""Tests of the sinusoid toy of the similarity paper (cadalign.similarity.toy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cadalign.config import ConfigError, from_dict
from cadalign.similarity.toy import ToyConfig, loglog_slope, make_data, make_mlp


def test_make_data_is_on_the_circle_with_the_sinusoid_target() -> None:
    alpha, x, y = make_data(100, 4.0, np.random.default_rng(3))
    assert np.all(np.diff(alpha) >= 0) and alpha.min() >= 0 and alpha.max() < 1
    np.testing.assert_allclose(x.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[:, 0].numpy(), np.sin(8 * np.pi * alpha), atol=1e-6)
    again, _, _ = make_data(100, 16.0, np.random.default_rng(3))
    np.testing.assert_array_equal(alpha, again)  # the frequency does not change the samples


def test_mlp_shape_and_seeded_init() -> None:
    a = make_mlp(64, 6, torch.Generator().manual_seed(1))
    b = make_mlp(64, 6, torch.Generator().manual_seed(1))
    linears = [m for m in a if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 64)] + [(64, 64)] * 5 + [(64, 1)]
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_loglog_slope_of_power_law() -> None:
    f = np.array([2.0, 4.0, 8.0, 16.0])
    assert loglog_slope(f, 3000 / f) == pytest.approx(-1.0)
    assert math.isnan(loglog_slope(f, np.array([1.0, 0.0, 1.0, 1.0])))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="taus"):
        from_dict(ToyConfig, {"taus": [1.5]}, "params.yaml: toy")
    with pytest.raises(ConfigError, match="toy.n_run"):
        from_dict(ToyConfig, {"n_run": 3}, "params.yaml: toy")
