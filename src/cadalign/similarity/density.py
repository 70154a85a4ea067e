"""Neighbour counts, nearest neighbours and uncertainty from per-sample gradients.

The dataset ``D`` is never held in memory: it is a *chunk source*, i.e. either an iterable
of gradient chunks ``(b, p, d)`` (enough for one pass) or a zero-argument callable returning
a fresh such iterable (needed by the two-pass functions, e.g. a function that recomputes or
reloads the gradients). Chunks are visited in order; sample ``i`` of ``D`` is the ``i``-th
row over the concatenated chunks.

Self counting (one rule everywhere): the neighbour counts ``N_tau``, ``N_S``, ``N_alpha+``
and the uncertainty denominator INCLUDE the sample itself, as the paper's sums over
``x' in D`` do and as the linear-time ``N_S`` does by construction; ``k^C(x, x)`` enters
with its computed value (1 up to rounding for a full-rank ``C(x)``) and is defined as 1 for
a zero-gradient sample (which has ``k^C = 0`` to every other sample). The k nearest
neighbours and the ``k^C`` histograms EXCLUDE the query itself when its index in ``D`` is
given, since they describe the other samples.

Rotation-invariant counts: for ``d = 2`` the quadratic counts come also for
``k^{C,rot}`` (:func:`cadalign.similarity.kernels.k_rot`; the same self rule), as
``N_S_rot``, ``N_tau_rot_<tau>``, ``N_alpha_rot_<alpha>``. ``k^{C,rot}`` is not linear in
``K^C``, so ``N_S_rot`` has no linear-time form.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor
from tqdm import tqdm

from cadalign.similarity.kernels import DEFAULT_REL_FLOOR, cross_kernel, k_rot, k_trace, whiten, whitening

logger = logging.getLogger(__name__)

ChunkSource = Union[Iterable[Tensor], Callable[[], Iterable[Tensor]]]


class SoftCountResult(NamedTuple):
    """Linear-time soft counts.

    Attributes:
        n_s: ``(|D|,)`` float64 ``N_S(x)`` for every sample of ``D``, self included.
        degenerate: ``(|D|,)`` bool, True for zero-gradient samples.
    """

    n_s: Tensor
    degenerate: Tensor


class KnnResult(NamedTuple):
    """Nearest neighbours and ``k^C`` histograms of query samples against ``D``.

    Attributes:
        indices: ``(Q, k)`` int64 indices into ``D`` of the most similar samples, by
            decreasing ``k^C`` (``-1`` where ``D`` has fewer than ``k`` candidates).
        values: ``(Q, k)`` their ``k^C`` (``-inf`` where there is no candidate).
        hist: ``(Q, bins)`` int64 counts of ``k^C`` over equal bins of [0, 1] (last bin
            closed on the right).
        below: ``(Q,)`` int64 number of samples with ``k^C < 0`` (not in ``hist``).
        above: ``(Q,)`` int64 number with ``k^C > 1`` (rounding only; not in ``hist``).
    """

    indices: Tensor
    values: Tensor
    hist: Tensor
    below: Tensor
    above: Tensor


def _iterate(source: ChunkSource) -> Iterator[Tensor]:
    chunks = source() if callable(source) else source
    for chunk in chunks:
        if chunk.ndim != 3:
            raise ValueError(f"gradient chunks must have shape (b, p, d), got {tuple(chunk.shape)}")
        yield chunk


def _require_reiterable(source: ChunkSource, what: str) -> None:
    if not callable(source) and iter(source) is source:  # type: ignore[arg-type]
        raise ValueError(
            f"{what} passes over the dataset twice, but got a one-shot iterator/generator; "
            "pass a zero-argument function returning a fresh iterator of gradient chunks"
        )


def whitened_sum(source: ChunkSource, rel_floor: float = DEFAULT_REL_FLOOR) -> tuple[Tensor, int]:
    """First pass of the linear-time ``N_S``: ``S = sum_x A(x)``, ``A = G C^{-1/2}``.

    Each chunk is converted to float64, then whitened and summed (so ``C`` is formed from
    the same values as in :func:`neighbour_counts`, and the linear ``N_S`` equals the
    pairwise one to float64 rounding).

    Args:
        source: Chunk source of ``D`` (one pass).
        rel_floor: Eigenvalue floor, see :func:`cadalign.similarity.kernels.inv_sqrt_psd`.

    Returns:
        ``(S, n)``: ``S`` ``(p, d)`` float64 and the number of samples ``n``.

    Raises:
        ValueError: if ``D`` is empty or chunk shapes disagree.
    """
    total: Tensor | None = None
    n = 0
    for chunk in _iterate(source):
        a, _ = whiten(chunk.double(), rel_floor)
        part = a.sum(0)
        if total is not None and part.shape != total.shape:
            raise ValueError(f"chunk shape {tuple(chunk.shape)} does not match (p, d) = {tuple(total.shape)}")
        total = part if total is None else total + part
        n += chunk.shape[0]
    if total is None:
        raise ValueError("the gradient chunk source is empty; nothing to sum")
    return total, n


def soft_counts_against(
    g: Tensor, s: Tensor, rel_floor: float = DEFAULT_REL_FLOOR, warn: bool = True
) -> tuple[Tensor, Tensor]:
    """``N_S(x) = tr(A(x)^T S) / d`` for a chunk of samples, given ``S`` of :func:`whitened_sum`.

    Computed as ``tr(C^{-1/2} (G^T S)) / d`` in float64 without forming ``A``. If the
    samples belong to the dataset summed into ``S``, the result counts self; zero-gradient
    samples get 1 (their self-similarity).

    Args:
        g: Gradients ``(b, p, d)`` of the samples.
        s: ``(p, d)`` whitened sum over ``D``.
        rel_floor: Eigenvalue floor.
        warn: Log a warning for zero gradients.

    Returns:
        ``(n_s, degenerate)``: ``(b,)`` float64 and ``(b,)`` bool.

    Raises:
        ValueError: if the shapes of ``g`` and ``s`` disagree.
    """
    if g.ndim != 3 or g.shape[1:] != s.shape:
        raise ValueError(f"gradients {tuple(g.shape)} do not match the sum S {tuple(s.shape)}")
    g = g.double()
    r, degenerate = whitening(g, rel_floor, warn)
    m = g.transpose(1, 2) @ s.double()  # (b, d, d) = G^T S
    n_s = (r * m).sum((1, 2)) / g.shape[-1]  # tr(r^T G^T S), r symmetric
    return torch.where(degenerate, torch.ones_like(n_s), n_s), degenerate


def soft_counts_linear(
    source: ChunkSource, rel_floor: float = DEFAULT_REL_FLOOR, progress: bool = False
) -> SoftCountResult:
    """Linear-time soft neighbour count ``N_S(x) = sum_{x' in D} k^C(x, x')`` for all ``x in D``.

    Two passes (``S = sum A``, then ``tr(A^T S) / d`` per sample), ``O(|D| p d^2)`` time,
    ``O(p d)`` memory beyond one chunk; no ``|D| x |D|`` matrix. Self is counted.

    Args:
        source: Re-iterable chunk source of ``D`` (a callable returning a fresh iterator,
            or a list/sequence).
        rel_floor: Eigenvalue floor.
        progress: Show a tqdm bar over chunks of the second pass.

    Returns:
        :class:`SoftCountResult` (``n_s`` float64).

    Raises:
        ValueError: if ``source`` is a one-shot iterator or empty.
    """
    _require_reiterable(source, "soft_counts_linear")
    s, n = whitened_sum(source, rel_floor)
    counts, flags = [], []
    for chunk in tqdm(_iterate(source), desc="N_S pass 2", disable=not progress):
        n_s, degenerate = soft_counts_against(chunk, s, rel_floor, warn=False)  # pass 1 warned
        counts.append(n_s)
        flags.append(degenerate)
    out = SoftCountResult(torch.cat(counts), torch.cat(flags))
    if out.n_s.numel() != n:
        raise ValueError(
            f"the chunk source yielded {n} then {out.n_s.numel()} samples; it must be deterministic"
        )
    return out


def _self_mask(
    query_indices: Tensor | None, q: int, start: int, stop: int, device: torch.device
) -> Tensor | None:
    """(Q, stop-start) bool mask of self-pairs, or None."""
    if query_indices is None:
        return None
    cols = torch.arange(start, stop, device=device)
    return query_indices.to(device).view(q, 1) == cols.view(1, -1)


def _check_queries(queries: Tensor, query_indices: Tensor | None) -> None:
    if queries.ndim != 3:
        raise ValueError(f"queries must have shape (Q, p, d), got {tuple(queries.shape)}")
    if query_indices is not None and query_indices.shape != (queries.shape[0],):
        raise ValueError(
            f"query_indices must have shape ({queries.shape[0]},) matching queries, "
            f"got {tuple(query_indices.shape)}"
        )


def _similarities(
    queries: Tensor,
    source: ChunkSource,
    query_indices: Tensor | None,
    rel_floor: float,
    dtype: torch.dtype,
    rot: bool = False,
) -> Iterator[tuple[Tensor, Tensor | None, int, Tensor | None]]:
    """Yield ``(k^C, k^{C,rot} or None, start, self_mask)`` per chunk, each ``(Q, b)``.

    Self-pairs of zero gradients are set to 1 in both. Zero gradients are reported for the
    queries only (``D`` may be visited many times).
    """
    aq, deg_q = whiten(queries.to(dtype), rel_floor)
    start = 0
    for chunk in _iterate(source):
        ad, _ = whiten(chunk.to(device=queries.device, dtype=dtype), rel_floor, warn=False)
        kc = cross_kernel(aq, ad)
        sim, sim_rot = k_trace(kc), (k_rot(kc) if rot else None)
        stop = start + chunk.shape[0]
        mask = _self_mask(query_indices, queries.shape[0], start, stop, queries.device)
        if mask is not None:
            fix = mask & deg_q.view(-1, 1)
            sim = torch.where(fix, torch.ones_like(sim), sim)
            if sim_rot is not None:
                sim_rot = torch.where(fix, torch.ones_like(sim_rot), sim_rot)
        yield sim, sim_rot, start, mask
        start = stop


def count_keys(taus: Sequence[float], alphas: Sequence[float], rot: bool = False) -> list[str]:
    """Names of the counts of :func:`neighbour_counts`, in order; refuses levels that share one.

    Keys print the levels with ``:g`` (6 significant digits): ``N_S``, ``N_tau_<tau>``,
    ``N_alpha_<alpha>``, then with ``rot`` ``N_S_rot``, ``N_tau_rot_<tau>``,
    ``N_alpha_rot_<alpha>``. Two levels with the same key would silently add their counts
    into one (doubling it), so they are an error.

    Args:
        taus: Thresholds of the hard counts.
        alphas: Exponents of the positive-power counts.
        rot: Include the rotation-invariant counts.

    Returns:
        The keys.

    Raises:
        ValueError: naming ``taus`` or ``alphas`` and the repeated (or near-equal) value.
    """
    for name, levels in (("taus", taus), ("alphas", alphas)):
        seen: dict[str, float] = {}
        for value in levels:
            key = f"{value:g}"
            if key in seen:
                what = f"{value:g} twice" if seen[key] == value else f"{seen[key]!r} and {value!r}, equal to 6 digits"
                raise ValueError(
                    f"{name} has {what} (both would count into N_{name[:-1]}_{key}); list each value once, "
                    "differing in the first 6 significant digits"
                )
            seen[key] = value
    plain = [*(f"tau_{t:g}" for t in taus), *(f"alpha_{a:g}" for a in alphas)]
    keys = ["N_S", *(f"N_{k}" for k in plain)]
    if rot:
        keys += ["N_S_rot", *(f"N_{k.replace('_', '_rot_', 1)}" for k in plain)]
    return keys


def neighbour_counts(
    queries: Tensor,
    source: ChunkSource,
    taus: Sequence[float] = (0.9,),
    alphas: Sequence[float] = (1.0,),
    query_indices: Tensor | None = None,
    rel_floor: float = DEFAULT_REL_FLOOR,
    dtype: torch.dtype = torch.float64,
    rot: bool | None = None,
) -> dict[str, Tensor]:
    """All neighbour-count estimators of query samples against ``D``, by streaming ``k^C``.

    ``O(Q |D| p d)`` time; memory ``O(Q b)`` for a chunk of ``b`` samples.

    Args:
        queries: Gradients ``(Q, p, d)``.
        source: Chunk source of ``D`` (one pass).
        taus: Thresholds of ``N_tau = #{x' : k^C(x, x') >= tau}``.
        alphas: Exponents of ``N_alpha+ = sum_{k^C > 0} (k^C)^alpha``.
        query_indices: ``(Q,)`` indices of the queries in ``D`` if they belong to it; only
            used to give a zero-gradient query its self-similarity 1.
        rel_floor: Eigenvalue floor.
        dtype: Computation dtype.
        rot: Also the same counts of the rotation-invariant
            :func:`~cadalign.similarity.kernels.k_rot` (``d = 2`` only); None: when ``d = 2``.

    Returns:
        Dict of ``(Q,)`` tensors, keys as :func:`count_keys`: ``"N_S"``, ``"N_tau_<tau>"``
        per tau and ``"N_alpha_<alpha>"`` per alpha (the positive-only ``N_alpha+``), then
        ``"N_S_rot"``, ``"N_tau_rot_<tau>"``, ``"N_alpha_rot_<alpha>"`` with ``rot``; self
        included, see the module docstring.

    Raises:
        ValueError: on bad shapes, non-positive ``alphas``, repeated levels, or ``rot``
            with ``d != 2``.
    """
    _check_queries(queries, query_indices)
    if any(a <= 0 for a in alphas):
        raise ValueError(f"alphas must be > 0, got {list(alphas)}")
    rot = queries.shape[-1] == 2 if rot is None else rot
    q = queries.shape[0]
    out = {key: torch.zeros(q, dtype=dtype, device=queries.device) for key in count_keys(taus, alphas, rot)}
    for sim, sim_rot, _, _ in _similarities(queries, source, query_indices, rel_floor, dtype, rot):
        _add_counts(out, sim, sim_rot, taus, alphas)
    return out


def _add_counts(
    out: dict[str, Tensor], sim: Tensor, sim_rot: Tensor | None, taus: Sequence[float], alphas: Sequence[float]
) -> None:
    """Add the counts of one ``(Q, b)`` block of similarities (and of ``k^{C,rot}``) into ``out``."""
    for suffix, values in (("", sim), ("_rot", sim_rot)):
        if values is None:
            continue
        out[f"N_S{suffix}"] += values.sum(1)
        for t in taus:
            out[f"N_tau{suffix}_{t:g}"] += (values >= t).sum(1)
        pos = values.clamp_min(0)
        for a in alphas:
            out[f"N_alpha{suffix}_{a:g}"] += pos.pow(a).sum(1)


def counts_from_matrix(
    sim: Tensor, taus: Sequence[float] = (0.9,), alphas: Sequence[float] = (1.0,), sim_rot: Tensor | None = None
) -> dict[str, Tensor]:
    """The counts of :func:`neighbour_counts` from a full ``(n, n)`` similarity matrix of ``D`` against itself.

    The diagonal is the self-similarity and is counted (the module's rule). Any kernel
    works: ``k^C`` (then ``sim_rot`` is ``k^{C,rot}``) or a baseline such as the cosine of
    raw inputs, whose diagonal is 1 like ``k^C``'s.

    Args:
        sim: ``(n, n)`` similarities, row ``i`` = patch ``i`` against all.
        taus: Thresholds of ``N_tau``.
        alphas: Exponents of ``N_alpha+``.
        sim_rot: Optional ``(n, n)`` rotation-invariant similarities.

    Returns:
        Dict of ``(n,)`` tensors in ``sim``'s dtype, keys as :func:`count_keys`.

    Raises:
        ValueError: if a matrix is not square, or on repeated levels or non-positive alphas.
    """
    for m in (sim, sim_rot):
        if m is not None and (m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape != sim.shape):
            raise ValueError(f"similarity matrices must be (n, n) and alike, got {tuple(m.shape)}")
    if any(a <= 0 for a in alphas):
        raise ValueError(f"alphas must be > 0, got {list(alphas)}")
    keys = count_keys(taus, alphas, sim_rot is not None)
    out = {key: torch.zeros(sim.shape[0], dtype=sim.dtype, device=sim.device) for key in keys}
    _add_counts(out, sim, sim_rot, taus, alphas)
    return out


def all_neighbour_counts(
    source: ChunkSource,
    taus: Sequence[float] = (0.9,),
    alphas: Sequence[float] = (1.0,),
    rel_floor: float = DEFAULT_REL_FLOOR,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    rot: bool | None = None,
) -> dict[str, Tensor]:
    """:func:`neighbour_counts` of every sample of ``D`` against ``D`` (quadratic time).

    Args:
        source: Re-iterable chunk source of ``D``; each of its chunks is used as a query
            batch against one full pass over ``D``.
        taus: Thresholds, see :func:`neighbour_counts`.
        alphas: Exponents, see :func:`neighbour_counts`.
        rel_floor: Eigenvalue floor.
        dtype: Computation dtype.
        progress: Show a tqdm bar over query chunks.
        rot: Also the rotation-invariant counts, see :func:`neighbour_counts`.

    Returns:
        Dict of ``(|D|,)`` tensors, keys as in :func:`neighbour_counts`.

    Raises:
        ValueError: if ``source`` is a one-shot iterator.
    """
    _require_reiterable(source, "all_neighbour_counts")
    parts: dict[str, list[Tensor]] = {}
    start = 0
    for chunk in tqdm(_iterate(source), desc="neighbour counts", disable=not progress):
        idx = torch.arange(start, start + chunk.shape[0], device=chunk.device)
        counts = neighbour_counts(chunk, source, taus, alphas, idx, rel_floor, dtype, rot)
        for key, value in counts.items():
            parts.setdefault(key, []).append(value)
        start += chunk.shape[0]
    if not parts:
        raise ValueError("the gradient chunk source is empty; nothing to count")
    return {key: torch.cat(values) for key, values in parts.items()}


def nearest_neighbours(
    queries: Tensor,
    source: ChunkSource,
    k: int = 10,
    query_indices: Tensor | None = None,
    bins: int = 100,
    rel_floor: float = DEFAULT_REL_FLOOR,
    dtype: torch.dtype = torch.float64,
) -> KnnResult:
    """k most similar samples of ``D`` and the ``k^C`` histogram, per query, in one pass.

    The query itself (given by ``query_indices``) is excluded from both.

    Args:
        queries: Gradients ``(Q, p, d)``.
        source: Chunk source of ``D`` (one pass).
        k: Number of neighbours.
        query_indices: ``(Q,)`` indices of the queries in ``D``, or None if they are not in it.
        bins: Number of equal histogram bins on [0, 1].
        rel_floor: Eigenvalue floor.
        dtype: Computation dtype.

    Returns:
        :class:`KnnResult`.

    Raises:
        ValueError: on bad shapes, ``k < 1`` or ``bins < 1``.
    """
    _check_queries(queries, query_indices)
    knn = _KnnAccumulator(queries.shape[0], k, bins, dtype, queries.device)
    for sim, _, start, mask in _similarities(queries, source, query_indices, rel_floor, dtype):
        knn.add(sim, start, mask)
    return knn.result()


class _KnnAccumulator:
    """Running k best and ``[0, 1]`` histogram of ``(Q, b)`` similarity blocks (self-pairs masked out)."""

    def __init__(self, q: int, k: int, bins: int, dtype: torch.dtype, device: torch.device) -> None:
        if k < 1 or bins < 1:
            raise ValueError(f"k and bins must be >= 1, got k={k}, bins={bins}")
        self.k, self.bins = k, bins
        self.best_v = torch.full((q, k), -math.inf, dtype=dtype, device=device)
        self.best_i = torch.full((q, k), -1, dtype=torch.long, device=device)
        self.hist = torch.zeros(q * bins, dtype=torch.long, device=device)
        self.below = torch.zeros(q, dtype=torch.long, device=device)
        self.above = torch.zeros(q, dtype=torch.long, device=device)
        self.rows = torch.arange(q, device=device).view(-1, 1)

    def add(self, sim: Tensor, start: int, mask: Tensor | None) -> None:
        """Fold in the similarities of the samples ``start .. start + b``; ``mask`` marks self-pairs."""
        q, bins, dev = sim.shape[0], self.bins, sim.device
        valid = torch.ones_like(sim, dtype=torch.bool) if mask is None else ~mask
        self.below += ((sim < 0) & valid).sum(1)
        self.above += ((sim > 1) & valid).sum(1)
        inside = valid & (sim >= 0) & (sim <= 1)
        bin_idx = (sim * bins).floor().long().clamp(0, bins - 1) + self.rows * bins
        self.hist += torch.bincount(bin_idx[inside], minlength=q * bins)
        cand_v = torch.cat([self.best_v, sim.to(self.best_v.dtype).masked_fill(~valid, -math.inf)], 1)
        idx = torch.arange(start, start + sim.shape[1], device=dev).expand(q, -1)
        cand_i = torch.cat([self.best_i, torch.where(valid, idx, torch.full_like(idx, -1))], 1)
        self.best_v, pos = cand_v.topk(self.k, dim=1)
        self.best_i = cand_i.gather(1, pos)

    def result(self) -> KnnResult:
        return KnnResult(self.best_i, self.best_v, self.hist.view(-1, self.bins), self.below, self.above)


def knn_from_matrix(sim: Tensor, query_indices: Tensor, k: int = 10, bins: int = 100) -> KnnResult:
    """:func:`nearest_neighbours` of some samples of ``D`` from the full ``(n, n)`` similarity matrix.

    Args:
        sim: ``(n, n)`` similarities of ``D`` against itself.
        query_indices: ``(Q,)`` int64 indices of the queries (their self-pair is excluded).
        k: Number of neighbours.
        bins: Number of equal histogram bins on [0, 1].

    Returns:
        :class:`KnnResult`.

    Raises:
        ValueError: if ``k < 1`` or ``bins < 1``.
    """
    query_indices = query_indices.to(sim.device)
    knn = _KnnAccumulator(len(query_indices), k, bins, sim.dtype, sim.device)
    block = sim[query_indices]
    knn.add(block, 0, _self_mask(query_indices, len(query_indices), 0, sim.shape[1], sim.device))
    return knn.result()


def uncertainty(source: ChunkSource) -> Tensor:
    """Prediction uncertainty of paper section 4.4, ``||grad f(x)||^2 / sum_x' k^I(x, x')``.

    ``k^I(x, x') = grad f(x) . grad f(x')`` is the un-normalised inner product (eq. 1); for
    ``d > 1`` outputs it is taken as ``tr K(x, x') = <G(x), G(x')>_F`` and
    ``||grad f(x)||^2 = ||G(x)||_F^2``. The sum over ``D`` (self included) is linear:
    ``<G(x), T>_F`` with ``T = sum_x' G(x')``. A zero-gradient sample gets 0 (its output
    cannot move); a non-positive denominator (the move would disturb nothing on balance)
    gives ``+inf``, with a warning.

    Args:
        source: Re-iterable chunk source of ``D``.

    Returns:
        ``(|D|,)`` float64 uncertainty factors.

    Raises:
        ValueError: if ``source`` is a one-shot iterator or empty.
    """
    _require_reiterable(source, "uncertainty")
    total: Tensor | None = None
    for chunk in _iterate(source):
        part = chunk.to(torch.float64).sum(0)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("the gradient chunk source is empty")
    out = []
    for chunk in _iterate(source):
        g = chunk.to(torch.float64)
        num = (g * g).sum((1, 2))
        den = (g * total).sum((1, 2))
        safe_den = den.where(den > 0, torch.ones_like(den))
        val = torch.where(den > 0, num / safe_den, torch.full_like(num, math.inf))
        out.append(torch.where(num == 0, torch.zeros_like(val), val))
    result = torch.cat(out)
    n_zero = int((result == 0).sum())
    n_inf = int(torch.isinf(result).sum())
    if n_zero or n_inf:
        logger.warning(
            "uncertainty: %d zero-gradient samples set to 0, %d non-positive denominators set to inf",
            n_zero,
            n_inf,
        )
    return result
