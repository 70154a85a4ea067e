"""The sinusoid check of the neighbour-count estimators (paper section 4.3, Fig. 4).

Samples ``alpha ~ U[0, 1)`` (one fixed set of ``n`` samples), input
``(cos 2 pi alpha, sin 2 pi alpha)``, target ``sin(2 pi f alpha)``. For each frequency ``f``
and each of several runs (different initialisation and batch order), an MLP
``2 -> width (x hidden_layers, ReLU) -> 1`` is trained with an L1 loss and Adam; then every
estimator (``N_S``, ``N_tau``, ``N_alpha+``) is computed for every sample against the whole
set (self included, see :mod:`cadalign.similarity.density`). Per sample, the median over
runs is taken; the summary per ``f`` is the median over samples. Expected: every count
decreases with ``f``, roughly like ``1 / f`` at high ``f`` (log-log slope near -1).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cadalign.similarity.density import all_neighbour_counts, soft_counts_linear
from cadalign.similarity.grads import per_sample_grads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyConfig:
    """Settings of the sinusoid experiment (section ``toy`` of ``pipelines/toy/params.yaml``)."""

    n_samples: int = 2048
    frequencies: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    n_runs: int = 5  # trainings per frequency; estimators are median-aggregated per sample
    hidden_width: int = 64
    hidden_layers: int = 6  # number of hidden Linear+ReLU layers
    # Adam steps on minibatches. The reference trained 5,000 epochs at lr 1e-4, batch 64
    # (160k steps); 24k steps at lr 2e-3, batch 128 make every estimator decrease with f
    # in ~10 min on one CPU thread. Fewer steps leave high f under-fitted, with higher
    # counts there: N_S slope -0.77 at 4k steps, -0.81 at 8k, -0.83 at 12k (where N_tau
    # for tau >= 0.9 is flat from f = 4 to 8), -0.87 at 24k.
    steps: int = 24000
    batch_size: int = 128
    lr: float = 2e-3
    # "constant" as the reference. "cosine" decays the rate to 0: a near-perfect fit, but
    # higher counts at high f (measured N_S slope -0.43 at 6k steps, lr 1e-3).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    taus: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)  # hard-threshold estimators N_tau
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0)  # exponents of the N_alpha+ estimators
    grad_chunk: int = 512  # samples per per-sample-gradient / similarity chunk
    seed: int = 0  # data (fixed over runs) and per-run seeds derive from it

    def validate(self) -> None:
        """Check sizes and lists.

        Raises:
            ValueError: naming the offending field.
        """
        if self.n_samples < 2:
            raise ValueError(f"n_samples={self.n_samples} must be >= 2")
        if not self.frequencies or min(self.frequencies) <= 0:
            raise ValueError(f"frequencies {self.frequencies} must be a non-empty list of positive numbers")
        for name in ("n_runs", "hidden_width", "hidden_layers", "steps", "batch_size", "grad_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if any(not 0 <= t <= 1 for t in self.taus):
            raise ValueError(f"taus {self.taus} must lie in [0, 1]")
        if any(a <= 0 for a in self.alphas):
            raise ValueError(f"alphas {self.alphas} must be positive")


@dataclass(frozen=True)
class ToyResult:
    """Outcome of :func:`run_toy`.

    Attributes:
        alpha: ``(n,)`` sorted sample positions.
        per_sample: estimator name -> ``(len(frequencies), n)`` per-sample medians over runs.
        final_loss: ``(len(frequencies), n_runs)`` training L1 loss on all samples at the end.
        seconds: wall-clock time of the whole experiment.
    """

    alpha: np.ndarray
    per_sample: dict[str, np.ndarray]
    final_loss: np.ndarray
    seconds: float


def make_data(n: int, frequency: float, rng: np.random.Generator) -> tuple[np.ndarray, Tensor, Tensor]:
    """Sorted ``alpha ~ U[0, 1)``, inputs ``(n, 2)`` on the circle and targets ``(n, 1)``.

    Args:
        n: Number of samples.
        frequency: ``f`` of the target ``sin(2 pi f alpha)``.
        rng: Random generator for ``alpha``.

    Returns:
        ``(alpha, x, y)`` with ``x``, ``y`` float32 tensors.
    """
    alpha = np.sort(rng.random(n))
    angle = 2 * math.pi * alpha
    x = torch.from_numpy(np.stack([np.cos(angle), np.sin(angle)], 1)).float()
    y = torch.from_numpy(np.sin(frequency * angle)).float().unsqueeze(1)
    return alpha, x, y


def make_mlp(width: int, hidden_layers: int, generator: torch.Generator) -> nn.Sequential:
    """MLP ``2 -> width (x hidden_layers, ReLU) -> 1`` initialised from ``generator``.

    Args:
        width: Hidden width.
        hidden_layers: Number of hidden Linear+ReLU layers.
        generator: Source of the (PyTorch-default-style) uniform initialisation.

    Returns:
        The network.
    """
    dims = [2] + [width] * hidden_layers
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for module in net:
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)  # nn.Linear's default bounds
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
    return net


def train_mlp(net: nn.Module, x: Tensor, y: Tensor, cfg: ToyConfig, generator: torch.Generator) -> float:
    """Train ``net`` on ``(x, y)`` with L1 loss and Adam; return the final full-set L1 loss.

    Args:
        net: The MLP.
        x: ``(n, 2)`` inputs.
        y: ``(n, 1)`` targets.
        cfg: Steps, batch size, learning rate and its schedule.
        generator: Minibatch sampling.

    Returns:
        Mean absolute error on all samples after training.
    """
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
        if cfg.lr_schedule == "cosine"
        else None
    )
    n = x.shape[0]
    batch = min(cfg.batch_size, n)
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(cfg.steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos : pos + batch]
        pos += batch
        loss = (net(x[idx]) - y[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        return float((net(x) - y).abs().mean())


def estimate_counts(net: nn.Module, x: Tensor, cfg: ToyConfig) -> dict[str, np.ndarray]:
    """Every estimator for every sample of ``x`` against all of ``x`` (self included).

    ``N_S`` comes from the linear-time two-pass formula; ``N_tau`` and ``N_alpha+`` from
    streaming all pairs in float32 (``k^C`` accurate to ~1e-6, ample for counts).

    Args:
        net: Trained MLP.
        x: ``(n, 2)`` inputs.
        cfg: Thresholds, exponents and chunk size.

    Returns:
        Estimator name -> ``(n,)`` float64 array.
    """
    params = list(net.named_parameters())
    grads = per_sample_grads(net, params, (x,), lambda out: out, chunk_size=cfg.grad_chunk)
    chunks = list(grads.split(cfg.grad_chunk))
    out = {"N_S": soft_counts_linear(chunks).n_s.numpy()}
    pairwise = all_neighbour_counts(chunks, cfg.taus, cfg.alphas, dtype=torch.float32)
    out.update({k: v.double().numpy() for k, v in pairwise.items() if k != "N_S"})
    return out


def run_toy(cfg: ToyConfig, progress: bool = True) -> ToyResult:
    """Run the whole experiment (all frequencies, all runs).

    Args:
        cfg: Experiment settings.
        progress: Show a tqdm bar over trainings.

    Returns:
        :class:`ToyResult`.
    """
    start = time.perf_counter()
    data_seq, runs_seq = np.random.SeedSequence(cfg.seed).spawn(2)
    run_seeds = runs_seq.generate_state(len(cfg.frequencies) * cfg.n_runs, dtype=np.uint64)
    per_sample: dict[str, list[np.ndarray]] = {}
    losses = np.zeros((len(cfg.frequencies), cfg.n_runs))
    alpha = np.empty(0)
    bar = tqdm(total=len(cfg.frequencies) * cfg.n_runs, desc="toy runs", disable=not progress)
    for i, freq in enumerate(cfg.frequencies):
        alpha, x, y = make_data(cfg.n_samples, freq, np.random.default_rng(data_seq))
        runs: dict[str, list[np.ndarray]] = {}
        for r in range(cfg.n_runs):
            gen = torch.Generator().manual_seed(int(run_seeds[i * cfg.n_runs + r] % (2**63)))
            net = make_mlp(cfg.hidden_width, cfg.hidden_layers, gen)
            losses[i, r] = train_mlp(net, x, y, cfg, gen)
            for name, values in estimate_counts(net, x, cfg).items():
                runs.setdefault(name, []).append(values)
            bar.update()
        for name, values in runs.items():
            per_sample.setdefault(name, []).append(np.median(np.stack(values), axis=0))
        logger.info(
            "f=%g: median N_S %.1f, final L1 %.4f",
            freq,
            float(np.median(per_sample["N_S"][-1])),
            float(np.median(losses[i])),
        )
    bar.close()
    return ToyResult(
        alpha=alpha,
        per_sample={k: np.stack(v) for k, v in per_sample.items()},
        final_loss=losses,
        seconds=time.perf_counter() - start,
    )


def loglog_slope(freqs: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``log(values)`` against ``log(freqs)``.

    Args:
        freqs: Positive frequencies.
        values: Positive counts, same length (at least 2).

    Returns:
        The slope (``nan`` if a value is not positive).

    Raises:
        ValueError: if fewer than 2 points are given.
    """
    if len(freqs) < 2 or len(freqs) != len(values):
        raise ValueError(f"need >= 2 matching points for a slope, got {len(freqs)} and {len(values)}")
    if np.any(np.asarray(values) <= 0):
        return math.nan
    return float(np.polyfit(np.log(freqs), np.log(values), 1)[0])


def frequency_label(freq: float) -> str:
    """Metric-name label of a frequency.

    Args:
        freq: The frequency.

    Returns:
        ``"f1"`` for 1.0, ``"f1.5"`` for 1.5 (valid in MLflow metric names).
    """
    return f"f{freq:g}"


def summarize(cfg: ToyConfig, result: ToyResult, min_slope_frequency: float = 2.0) -> dict[str, Any]:
    """Metrics of the experiment: medians per ``f``, slopes, monotonicity, losses, time.

    Args:
        cfg: The settings used.
        result: Output of :func:`run_toy`.
        min_slope_frequency: Slopes are fitted on frequencies ``>= min_slope_frequency``.

    Returns:
        A JSON-serialisable dict (keys valid as MLflow metric names once flattened):
        ``median`` (estimator -> {``f<f>``: median over samples of the per-sample median
        over runs}), ``slope`` (estimator -> log-log slope over ``f >= min_slope_frequency``),
        ``decreasing`` (estimator -> 1 if strictly decreasing in ``f`` else 0),
        ``all_decreasing``, ``final_l1`` ({``f<f>``: median final training L1 over runs})
        and ``seconds``.
    """
    freqs = np.asarray(cfg.frequencies, dtype=float)
    order = np.argsort(freqs)
    labels = [frequency_label(f) for f in freqs]
    medians = {k: np.median(v, axis=1) for k, v in result.per_sample.items()}
    keep = freqs >= min_slope_frequency
    slopes = {
        k: (loglog_slope(freqs[keep], v[keep]) if keep.sum() >= 2 else math.nan) for k, v in medians.items()
    }
    decreasing = {k: int(np.all(np.diff(v[order]) < 0)) for k, v in medians.items()}
    return {
        "median": {k: dict(zip(labels, v.tolist())) for k, v in medians.items()},
        "slope": slopes,
        "decreasing": decreasing,
        "all_decreasing": int(all(decreasing.values())),
        "final_l1": dict(zip(labels, np.median(result.final_loss, axis=1).tolist())),
        "seconds": result.seconds,
    }
