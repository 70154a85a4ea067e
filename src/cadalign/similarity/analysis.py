"""Per-round gradient-similarity analysis of an alignment network (paper section 4).

Building blocks of the ``similarity@round`` stage, free of raster I/O (torch, numpy and
shapely only), in the order the stage uses them:

1. **One patch set for every round**, chosen by :mod:`cadalign.similarity.windows` (the
   windows of each tile, and the cap on their number).
   :func:`choose_queries` draws the query patches: ``min(n_queries, n)`` distinct indices
   from ``np.random.default_rng([seed, QUERY_STREAM])``, sorted.
2. **Gradients, streamed.** :class:`GradientSource` is a re-iterable chunk source of
   per-sample output gradients (:func:`cadalign.similarity.grads.iter_grad_chunks`) that
   keeps the chunks in memory after its first full pass when they fit in ``cache_bytes``
   (then the quadratic counts and the neighbour search cost no further backward passes);
   otherwise every pass recomputes them.
3. **Statistics.** :func:`analyse` computes, over the patch set ``D``: the linear-time
   ``N_S`` (two passes, :func:`~cadalign.similarity.density.soft_counts_linear`); the hard and
   positive-power counts ``N_tau`` / ``N_alpha+`` (and ``N_S`` again) by
   :func:`~cadalign.similarity.density.all_neighbour_counts`, which is QUADRATIC: one pass
   over ``D`` per chunk of queries, ``|D|^2`` values of ``k^C`` in all (fine for the few
   hundred patches of the study; with the cache no gradient is recomputed); and for the
   query patches the ``k`` nearest neighbours and the ``k^C`` histogram over ``[0, 1]``
   (:func:`~cadalign.similarity.density.nearest_neighbours`). For ``d = 2`` outputs the
   quadratic counts come also for the rotation-invariant ``k^{C,rot}`` (``N_S_rot``,
   ``N_tau_rot_<tau>``, ``N_alpha_rot_<alpha>``).
   Self-counting follows :mod:`cadalign.similarity.density`: the counts include the patch
   itself, the neighbours and the query histograms exclude it.
4. **Summaries.** :func:`ns_histogram` (bins with one example patch each),
   :func:`summary_metrics`, :func:`peak_memory_bytes`.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from cadalign.similarity.density import (
    KnnResult,
    all_neighbour_counts,
    counts_from_matrix,
    knn_from_matrix,
    nearest_neighbours,
    soft_counts_linear,
)
from cadalign.similarity.grads import Method, OutputFn, ParamList, iter_grad_chunks, per_sample_grads
from cadalign.similarity.kernels import DEFAULT_REL_FLOOR, inv_sqrt_psd, k_rot, k_trace

logger = logging.getLogger(__name__)

QUERY_STREAM = 1
"""Second word of the query generator's seed, so queries and per-tile choices never share a stream."""


def nearest_valid_input_size(is_valid: Callable[[int], bool], size: int, search: int = 64) -> int:
    """The valid network input size closest to ``size`` (ties: the smaller one).

    Args:
        is_valid: Predicate of valid input sizes, e.g. one that calls
            ``AlignNet.output_size`` and catches its ValueError.
        size: Wanted input side in pixels (>= 1).
        search: Largest distance searched on either side.

    Returns:
        The nearest valid size.

    Raises:
        ValueError: if ``size`` < 1 or no valid size lies within ``search`` pixels.
    """
    if size < 1:
        raise ValueError(f"patch size {size} must be >= 1 px")
    for delta in range(search + 1):
        for cand in (size - delta, size + delta):
            if cand >= 1 and is_valid(cand):
                return cand
    raise ValueError(f"no valid network input size within {search} px of {size}; check similarity.patch_size")


def nearest_network_input_size(model: nn.Module, size: int) -> int:
    """:func:`nearest_valid_input_size` for a network with an ``output_size(input)`` method.

    Args:
        model: E.g. an ``AlignNet``, whose ``output_size`` raises ValueError for an
            invalid input size.
        size: Wanted input side in pixels.

    Returns:
        The nearest valid input side.

    Raises:
        ValueError: as :func:`nearest_valid_input_size`.
    """

    def valid(cand: int) -> bool:
        try:
            model.output_size(cand)
        except ValueError:
            return False
        return True

    return nearest_valid_input_size(valid, size)


def choose_queries(n: int, n_queries: int, seed: int) -> np.ndarray:
    """Indices of the query patches: ``min(n_queries, n)`` distinct patches, sorted.

    Args:
        n: Number of patches.
        n_queries: Wanted number of queries (>= 1).
        seed: Study seed (the generator is ``default_rng([seed, QUERY_STREAM])``).

    Returns:
        ``(q,)`` int64 sorted indices.

    Raises:
        ValueError: if ``n_queries`` < 1.
    """
    if n_queries < 1:
        raise ValueError(f"n_queries={n_queries} must be >= 1")
    if n_queries > n:
        logger.warning("only %d patches: all of them are queries (n_queries=%d)", n, n_queries)
    rng = np.random.default_rng([seed, QUERY_STREAM])
    return np.sort(rng.choice(n, min(n_queries, n), replace=False)).astype(np.int64)


class GradientSource:
    """Re-iterable source of per-sample gradient chunks ``(b, p, d)``, cached when small.

    Calling the object returns a fresh iterator over the chunks of all samples in order.
    After the first COMPLETE pass the chunks are kept (on their device) if their total size
    is at most ``cache_bytes``; later passes then replay them. Otherwise each pass
    recomputes the gradients (logged once).

    Attributes:
        passes: Number of passes that computed gradients (not replays).
        grad_seconds: Wall time spent computing gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamList,
        inputs: tuple[Tensor, ...],
        output_fn: OutputFn,
        chunk_size: int,
        method: Method = "auto",
        cache_bytes: int = 4 << 30,
    ) -> None:
        """Set up the source (nothing is computed yet).

        Args:
            model: The network, in eval mode.
            params: ``(name, parameter)`` pairs to differentiate.
            inputs: Batched inputs (may stay on the CPU).
            output_fn: Maps the model output to ``(B, d)``.
            chunk_size: Samples per chunk.
            method: See :func:`cadalign.similarity.grads.per_sample_grads`.
            cache_bytes: Largest total gradient size kept in memory (0 disables the cache).
        """
        self.model, self.params, self.inputs, self.output_fn = model, params, inputs, output_fn
        self.chunk_size, self.method, self.cache_bytes = chunk_size, method, cache_bytes
        self.passes = 0
        self.grad_seconds = 0.0
        self._cache: list[Tensor] | None = None

    @property
    def cached(self) -> bool:
        """True once the gradients are held in memory."""
        return self._cache is not None

    def __call__(self) -> Iterator[Tensor]:
        """A fresh iterator over the gradient chunks."""
        if self._cache is not None:
            return iter(self._cache)
        return self._compute()

    def rows(self, indices: Tensor) -> Tensor:
        """Gradients of the samples ``indices``, ``(len(indices), p, d)``.

        Read from the cache when it is filled, otherwise computed for those samples only.

        Args:
            indices: ``(q,)`` int64 sample indices (CPU).

        Returns:
            The gradients, on the device of the chunks.
        """
        if self._cache is None:
            chosen = tuple(x[indices] for x in self.inputs)
            return per_sample_grads(
                self.model, self.params, chosen, self.output_fn, self.chunk_size, self.method
            )
        size = self.chunk_size
        return torch.stack([self._cache[int(i) // size][int(i) % size] for i in indices])

    def _compute(self) -> Iterator[Tensor]:
        self.passes += 1
        kept: list[Tensor] = []
        size = 0
        start = time.perf_counter()
        for chunk in iter_grad_chunks(
            self.model, self.params, self.inputs, self.output_fn, self.chunk_size, self.method
        ):
            self.grad_seconds += time.perf_counter() - start
            size += chunk.numel() * chunk.element_size()
            if size <= self.cache_bytes:
                kept.append(chunk)
            yield chunk
            start = time.perf_counter()
        if size <= self.cache_bytes:
            self._cache = kept
            logger.info("per-sample gradients cached in memory (%.1f MB)", size / 2**20)
        elif self.passes == 1:
            logger.warning(
                "per-sample gradients (%.1f MB) exceed the cache budget (%.1f MB): every pass "
                "recomputes them (the quadratic counts take one pass per chunk)",
                size / 2**20,
                self.cache_bytes / 2**20,
            )


def kernel_matrices(
    parts: Sequence[Tensor], rel_floor: float = DEFAULT_REL_FLOOR, step: int = 8192
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``k^C`` of every pair of samples held in memory, from one float64 Gram matrix.

    The raw kernels ``K(x, x') = G(x)^T G(x')`` of all pairs come from one product of the
    ``(n d) x p`` stacked gradients with themselves, accumulated over slices of ``step``
    parameters (each slice converted to float64, so ``C(x)`` is the same float64 matrix the
    streaming functions form); then ``K^C = C(x)^{-1/2} K C(x')^{-1/2}`` per pair. ``O(n^2 d^2)``
    memory, no per-chunk re-whitening: the fast path when the gradients are cached.
    For ``d = 1`` (``parts`` of shape ``(b, m, 1)``) ``k^C`` is the cosine similarity of the
    vectors, which is how the baselines use it. Zero vectors follow
    :mod:`cadalign.similarity.kernels`: ``k^C`` 0 to every other sample, 1 to themselves.

    Args:
        parts: Chunks ``(b, p, d)`` of all samples, in order.
        rel_floor: Eigenvalue floor of ``C^{-1/2}``.
        step: Parameters per slice of the product (bounds the float64 copies).

    Returns:
        ``(k_c, k_rot, degenerate)``: ``(n, n)`` float64 ``k^C``, the ``(n, n)``
        ``k^{C,rot}`` for ``d = 2`` (else None), ``(n,)`` bool zero-vector flags.

    Raises:
        ValueError: if ``parts`` is empty or their shapes differ.
    """
    if not parts or any(c.ndim != 3 or c.shape[1:] != parts[0].shape[1:] for c in parts):
        raise ValueError(f"expected chunks (b, p, d) of one shape, got {[tuple(c.shape) for c in parts]}")
    p, d = parts[0].shape[1:]
    n = sum(c.shape[0] for c in parts)
    dev = parts[0].device
    gram = torch.zeros(n * d, n * d, dtype=torch.float64, device=dev)
    for lo in range(0, p, step):
        flat = torch.cat([c[:, lo : lo + step].double().transpose(1, 2).reshape(-1, c[:, lo : lo + step].shape[1]) for c in parts])
        gram.addmm_(flat, flat.T)
    k = gram.view(n, d, n, d).permute(0, 2, 1, 3)  # k[i, j] = G_i^T G_j
    diag = torch.arange(n, device=dev)
    r, degenerate = inv_sqrt_psd(k[diag, diag], rel_floor)
    kc = r[:, None] @ k @ r[None, :]
    sim, sim_rot = k_trace(kc), (k_rot(kc) if d == 2 else None)
    for m in (sim, sim_rot):
        if m is not None:
            m[diag[degenerate], diag[degenerate]] = 1.0  # self-similarity of a zero vector
    return sim, sim_rot, degenerate


def gram_fits(n: int, d: int, budget_bytes: int) -> bool:
    """Whether the ``(n d)^2`` float64 Gram matrix (and its ``k^C`` copies) fit in ``budget_bytes``."""
    return 3 * (n * d) ** 2 * 8 <= budget_bytes


def input_vectors(inputs: tuple[Tensor, ...]) -> Tensor:
    """The raw network inputs of each sample, flattened and concatenated: ``(n, m)`` (baseline (a))."""
    return torch.cat([x.flatten(1) for x in inputs], 1)


def layer_input_features(
    model: nn.Module,
    layer: nn.Module,
    inputs: tuple[Tensor, ...],
    pool: Literal["sum", "center"],
    chunk_size: int = 64,
) -> Tensor:
    """The input of ``layer`` (a feature map), pooled per sample: ``(n, C)`` (baseline (b)).

    For the alignment network, ``layer = model.disp_heads[0]``: its input is the last
    decoder level's features, the "perceptual" view of the network (paper section 2.3).
    Pooled the way the analysed output is taken: the mean over the map for ``"sum"``, the
    centre pixel ``(H // 2, W // 2)`` for ``"center"``.

    Args:
        model: The network in eval mode.
        layer: A module it calls once per forward pass.
        inputs: Batched inputs (may stay on the CPU).
        pool: ``"sum"`` or ``"center"``.
        chunk_size: Samples per forward pass.

    Returns:
        ``(n, C)`` float32 features on the model's device.

    Raises:
        ValueError: for an unknown ``pool`` or a layer the forward pass does not call.
    """
    if pool not in ("sum", "center"):
        raise ValueError(f"pool must be 'sum' or 'center', got {pool!r}")
    device = next(model.parameters()).device
    kept: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, out: kept.append(args[0]))
    out = []
    try:
        with torch.no_grad():
            for start in range(0, inputs[0].shape[0], chunk_size):
                kept.clear()
                model(*(x[start : start + chunk_size].to(device) for x in inputs))
                if len(kept) != 1:
                    raise ValueError(f"the layer ran {len(kept)} times in one forward pass; expected once")
                f = kept[0]
                out.append(f.mean((2, 3)) if pool == "sum" else f[:, :, f.shape[2] // 2, f.shape[3] // 2])
    finally:
        handle.remove()
    return torch.cat(out).float()


def baseline_counts(
    vectors: Tensor, taus: Sequence[float], alphas: Sequence[float]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Neighbour counts under the cosine similarity of per-sample vectors (the baselines' kernel).

    ``k(x, x') = <v(x), v(x')> / (|v(x)| |v(x')|)`` is ``k^C`` of a one-output "gradient"
    ``v(x)``: 1 on the diagonal and in [-1, 1], so ``N_S``, ``N_tau``, ``N_alpha+`` mean the
    same as for the gradients (self included).

    Args:
        vectors: ``(n, m)`` per-sample vectors.
        taus: Thresholds of ``N_tau``.
        alphas: Exponents of ``N_alpha+``.

    Returns:
        ``(counts, sim)``: counts as :func:`~cadalign.similarity.density.count_keys`
        (``rot=False``), ``(n,)`` float64 arrays; and the ``(n, n)`` cosine matrix.
    """
    sim, _, _ = kernel_matrices([vectors.unsqueeze(-1)])
    counts = counts_from_matrix(sim, taus, alphas)
    return {key: value.cpu().numpy() for key, value in counts.items()}, sim.cpu().numpy()


@dataclass(frozen=True)
class SimilarityResult:
    """Statistics of one network on one patch set.

    Attributes:
        n_s: ``(n,)`` linear-time ``N_S`` (self counted).
        degenerate: ``(n,)`` bool, zero-gradient patches.
        counts: ``(n,)`` arrays by name: ``N_S`` (pairwise), ``N_tau_<tau>``, ``N_alpha_<alpha>``
            and, for ``d = 2``, ``N_S_rot``, ``N_tau_rot_<tau>``, ``N_alpha_rot_<alpha>``.
        query_indices: ``(q,)`` patch indices of the queries.
        knn: Nearest neighbours and ``k^C`` histograms of the queries (self excluded).
        timings: Seconds by phase (``gradients``, ``n_s``, ``counts``, ``knn``, ``total``)
            and ``gradient_passes``.
    """

    n_s: np.ndarray
    degenerate: np.ndarray
    counts: dict[str, np.ndarray]
    query_indices: np.ndarray
    knn: KnnResult
    timings: dict[str, float]


def analyse(
    model: nn.Module,
    params: ParamList,
    inputs: tuple[Tensor, ...],
    output_fn: OutputFn,
    query_indices: np.ndarray,
    k: int = 10,
    bins: int = 100,
    taus: Sequence[float] = (0.9,),
    alphas: Sequence[float] = (1.0,),
    chunk_size: int = 16,
    method: Method = "auto",
    cache_bytes: int = 4 << 30,
    progress: bool = False,
) -> SimilarityResult:
    """All statistics of the per-round analysis for one network and one patch set.

    Args:
        model: The network in eval mode, on its compute device.
        params: Parameters the output depends on (e.g. ``AlignNet.disp_parameters()``).
        inputs: Batched inputs of all patches (may stay on the CPU).
        output_fn: Maps the model output to ``(B, d)`` (e.g.
            :func:`cadalign.similarity.grads.alignment_output_fn`).
        query_indices: ``(q,)`` indices of the query patches.
        k: Nearest neighbours per query.
        bins: Bins of the query ``k^C`` histograms on ``[0, 1]``.
        taus: Thresholds of ``N_tau``.
        alphas: Exponents of ``N_alpha+``.
        chunk_size: Samples per gradient chunk.
        method: Per-sample gradient method.
        cache_bytes: Gradient cache budget, see :class:`GradientSource`.
        progress: Show tqdm bars.

    Returns:
        :class:`SimilarityResult`.

    Raises:
        ValueError: if there are no patches, or a query index is out of range.
    """
    n = inputs[0].shape[0]
    if n == 0:
        raise ValueError("the patch set is empty; nothing to analyse")
    query_indices = np.asarray(query_indices, dtype=np.int64)
    if query_indices.size and (query_indices.min() < 0 or query_indices.max() >= n):
        raise ValueError(f"query indices {query_indices.tolist()} out of range for {n} patches")
    t0 = time.perf_counter()
    source = GradientSource(model, params, inputs, output_fn, chunk_size, method, cache_bytes)
    soft = soft_counts_linear(source, progress=progress)
    t1 = time.perf_counter()
    qi = torch.from_numpy(query_indices)
    chunks = list(source()) if source.cached else []
    if chunks and gram_fits(n, chunks[0].shape[-1], cache_bytes):
        # all pairs from one Gram product of the cached gradients (no re-whitening per chunk)
        sim, sim_rot, _ = kernel_matrices(chunks)
        counts = counts_from_matrix(sim, taus, alphas, sim_rot)
        t2 = time.perf_counter()
        knn = knn_from_matrix(sim, qi, k=k, bins=bins)
    else:
        counts = all_neighbour_counts(source, taus=taus, alphas=alphas, progress=progress)
        t2 = time.perf_counter()
        queries = source.rows(qi)
        knn = nearest_neighbours(queries, source, k=k, query_indices=qi.to(queries.device), bins=bins)
    t3 = time.perf_counter()
    timings = {
        "gradients": source.grad_seconds,
        "gradient_passes": float(source.passes),
        "n_s": t1 - t0,
        "counts": t2 - t1,
        "knn": t3 - t2,
        "total": t3 - t0,
    }
    return SimilarityResult(
        n_s=soft.n_s.cpu().numpy(),
        degenerate=soft.degenerate.cpu().numpy(),
        counts={key: value.cpu().numpy() for key, value in counts.items()},
        query_indices=query_indices,
        knn=KnnResult(*(t.cpu() for t in knn)),
        timings=timings,
    )


def ns_histogram(n_s: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram of ``N_S`` with one example patch per bin.

    Args:
        n_s: ``(n,)`` soft counts.
        bins: Number of equal bins between the smallest and the largest value.

    Returns:
        ``(counts, edges, examples)``: ``(bins,)`` int64 counts, ``(bins + 1,)`` edges, and
        ``(bins,)`` int64 indices of the patch closest to each bin's centre among the
        patches in that bin (``-1`` for an empty bin).

    Raises:
        ValueError: if ``n_s`` is empty or ``bins`` < 1.
    """
    n_s = np.asarray(n_s, dtype=float)
    if n_s.size == 0 or bins < 1:
        raise ValueError(f"need at least one value and one bin, got {n_s.size} values and bins={bins}")
    low, high = float(n_s.min()), float(n_s.max())
    # Counts equal up to rounding (e.g. every patch sees all others) leave too small a range for
    # the bins: use a unit range with them at the centre of the middle bin.
    span = None
    if high - low <= 1e-9 * max(1.0, abs(high)):
        start = 0.5 * (low + high) - (bins // 2 + 0.5) / bins
        span = (start, start + 1.0)
    counts, edges = np.histogram(n_s, bins=bins, range=span)
    which = np.clip(np.searchsorted(edges, n_s, side="right") - 1, 0, bins - 1)
    examples = np.full(bins, -1, dtype=np.int64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    for b in range(bins):
        members = np.flatnonzero(which == b)
        if members.size:
            examples[b] = members[np.argmin(np.abs(n_s[members] - centres[b]))]
    return counts.astype(np.int64), edges, examples


def summary_metrics(result: SimilarityResult, threshold: float = 0.9) -> dict[str, float]:
    """Scalar summary of a :class:`SimilarityResult` (for metrics.json and MLflow).

    Args:
        result: The analysis result.
        threshold: ``k^C`` level of the neighbour fractions.

    Returns:
        ``n_patches``, ``n_queries``, ``n_zero_gradient`` (patches whose output does not
        depend on the parameters); ``N_S`` mean, median, std, min, max and quantiles
        ``N_S_q10 .. N_S_q90``; ``N_S_fraction_median`` (median ``N_S / n``); the mean of
        every other count, and for ``N_S_rot`` also its median and quantiles; ``knn_mean_kc`` (mean ``k^C`` of the queries'
        neighbours), ``knn_frac_above`` (fraction of those ``>= threshold``),
        ``query_frac_above`` (mean over queries of the fraction of all other patches with
        ``k^C >= threshold``, from the histograms, so to the bin resolution) and
        ``ns_pairwise_max_abs_diff`` (linear vs pairwise ``N_S``, a consistency check).
    """
    n_s = result.n_s
    n = n_s.size
    out: dict[str, float] = {
        "n_patches": float(n),
        "n_queries": float(result.query_indices.size),
        "n_zero_gradient": float(result.degenerate.sum()),
        "N_S_mean": float(n_s.mean()),
        "N_S_median": float(np.median(n_s)),
        "N_S_std": float(n_s.std()),
        "N_S_min": float(n_s.min()),
        "N_S_max": float(n_s.max()),
        "N_S_fraction_median": float(np.median(n_s) / n),
    }
    for q in (10, 25, 75, 90):
        out[f"N_S_q{q}"] = float(np.percentile(n_s, q))
    for key, value in result.counts.items():
        if key != "N_S":
            out[f"{key}_mean"] = float(value.mean())
    if "N_S_rot" in result.counts:
        n_s_rot = result.counts["N_S_rot"]
        out["N_S_rot_median"] = float(np.median(n_s_rot))
        for q in (10, 25, 75, 90):
            out[f"N_S_rot_q{q}"] = float(np.percentile(n_s_rot, q))
    if "N_S" in result.counts:
        out["ns_pairwise_max_abs_diff"] = float(np.abs(result.counts["N_S"] - n_s).max())
    values = result.knn.values.numpy()
    finite = values[np.isfinite(values)]
    if finite.size:
        out["knn_mean_kc"] = float(finite.mean())
        out["knn_frac_above"] = float((finite >= threshold).mean())
    hist = result.knn.hist.numpy()
    if hist.size and n > 1:
        first = int(math.floor(threshold * hist.shape[1] + 1e-9))
        others = hist.sum(1) + result.knn.below.numpy() + result.knn.above.numpy()
        above = hist[:, first:].sum(1) + result.knn.above.numpy()
        out["query_frac_above"] = float(np.mean(above / np.maximum(others, 1)))
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of the run: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak RSS.

    Args:
        device: The compute device.

    Returns:
        Bytes.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
