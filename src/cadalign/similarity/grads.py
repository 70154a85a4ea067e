"""Per-sample gradients of a network's OUTPUT (not its loss) with respect to chosen parameters.

For samples ``x_1..x_B`` and an output map ``output_fn(model(*inputs)) -> (B, d)``, the
functions here return ``G`` of shape ``(B, p, d)`` with
``G[b, :, j] = d output_fn(model(x_b))[j] / d theta`` over the ``p`` entries of the chosen
parameters, flattened and concatenated in the order given. Every other parameter and
every buffer is held fixed. Work runs on the device of the parameters: inputs are moved
there chunk by chunk (they may stay on the CPU), and the result is allocated there.

Three implementations, equal up to float rounding:

- ``"hooks"`` (per-layer capture, the default where supported): one batched forward pass
  keeps each selected layer's input and output (forward hook; the output handed on is a
  copy, so a following in-place activation such as ``ELU(inplace=True)`` cannot alter the
  kept one); ``d`` backward passes give the gradient with respect to each layer's output;
  the per-sample weight gradient is a batched matmul of that gradient with the unfolded
  input (``torch.nn.functional.unfold``; for a transposed convolution, of the input with
  the unfolded output gradient; on CPU, for maps of >= 256 pixels, the same product as one
  grouped convolution, one group per sample, ~3x faster there), the bias gradient its
  spatial sum; all ``d`` outputs share one unfold per layer. For a ``GroupNorm`` layer
  (``y = xhat * w + b``, ``xhat`` the input normalised per sample and group) the weight
  gradient is the spatial sum of ``xhat * grad_y`` per channel, with ``xhat`` recomputed
  from the kept input, and the bias gradient the spatial sum of ``grad_y``. It needs
  every selected parameter to be the weight or bias of a ``Linear``, ``Conv2d``,
  ``ConvTranspose2d`` (groups 1, zero padding) or ``GroupNorm`` layer and the layer inputs
  not to be modified in place afterwards; ``"auto"`` falls back to ``"vmap"`` otherwise.
- ``"vmap"``: ``torch.func.vmap`` over ``torch.func.jacrev`` of ``functional_call``; works
  for any differentiable model.
- :func:`per_sample_grads_loop`: one forward and ``d`` backward passes per sample; the
  slow reference used by tests and the benchmark.

Samples must not interact: batch-norm in training mode (batch statistics) and dropout
would make "per-sample" gradients ill-defined, so a model in training mode containing
such layers is refused; call ``model.eval()`` first.

Default (``"auto"`` = hooks where supported, which includes the study's network with
``train.model.norm: group``): with ``bench/bench_similarity.py`` on the shared 2-core CPU,
one thread, the study's network at 124 px, both batched paths and the loop run at the 1/d
ceiling of a training step (hooks 17.7-18.4 patches/s, vmap 18.3-18.9, loop 18.0, ceiling
17.9: a tie within the noise). The reference H100 figures favour per-layer capture (320 vs
272 samples/s), and vmap pays a tracing cost on its first call, so hooks stay the default.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

logger = logging.getLogger(__name__)

ParamList = Sequence[tuple[str, nn.Parameter]]
OutputFn = Callable[[Any], Tensor]
Method = Literal["auto", "hooks", "vmap"]

_COUPLING_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d, nn.Dropout3d)


class UnsupportedForHooks(ValueError):
    """The per-layer hook method cannot handle this model or parameter selection."""


def _check_args(model: nn.Module, params: ParamList, inputs: tuple[Tensor, ...], chunk_size: int) -> int:
    if not params:
        raise ValueError("params is empty; pass the (name, Parameter) pairs to differentiate")
    if not inputs:
        raise ValueError("inputs is empty; pass a tuple of batched input tensors")
    batch = inputs[0].shape[0]
    if any(x.shape[0] != batch for x in inputs):
        raise ValueError(f"all inputs need the same batch size, got {[tuple(x.shape) for x in inputs]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if model.training and any(isinstance(m, _COUPLING_LAYERS) for m in model.modules()):
        raise ValueError(
            "model is in training mode and has batch-norm/dropout layers, which couple or "
            "randomise samples; call model.eval() before computing per-sample gradients"
        )
    return batch


def _out_dim(y: Tensor, batch: int) -> int:
    if y.ndim != 2 or y.shape[0] != batch:
        raise ValueError(f"output_fn must return a (B, d) tensor with B = {batch}, got {tuple(y.shape)}")
    return y.shape[1]


def per_sample_grads(
    model: nn.Module,
    params: ParamList,
    inputs: tuple[Tensor, ...],
    output_fn: OutputFn,
    chunk_size: int = 16,
    method: Method = "auto",
) -> Tensor:
    """Batched per-sample output gradients ``(B, p, d)``.

    Args:
        model: The network; called as ``model(*inputs)`` on a chunk of samples.
        params: ``(name, parameter)`` pairs to differentiate (names as in
            ``model.named_parameters()``); all others are held fixed.
        inputs: Batched input tensors, first dimension ``B``.
        output_fn: Maps the model output to a ``(B, d)`` tensor.
        chunk_size: Samples per batched pass (bounds memory).
        method: ``"hooks"``, ``"vmap"`` or ``"auto"`` (hooks where supported, else vmap).

    Returns:
        ``(B, p, d)`` tensor in the parameters' dtype, on the parameters' device.

    Raises:
        ValueError: on empty or inconsistent arguments, a training-mode model with
            batch-norm/dropout, a bad ``output_fn`` shape, or ``method="hooks"`` on an
            unsupported model (:class:`UnsupportedForHooks`).
    """
    batch = _check_args(model, params, inputs, chunk_size)
    if method not in ("auto", "hooks", "vmap"):
        raise ValueError(f"method must be 'auto', 'hooks' or 'vmap', got {method!r}")
    if method in ("auto", "hooks"):
        try:
            return _hook_grads(model, params, inputs, output_fn, chunk_size, batch)
        except UnsupportedForHooks as err:
            if method == "hooks":
                raise
            logger.info("per-layer hooks unsupported (%s); using torch.func vmap", err)
    return _vmap_grads(model, params, inputs, output_fn, chunk_size, batch)


def iter_grad_chunks(
    model: nn.Module,
    params: ParamList,
    inputs: tuple[Tensor, ...],
    output_fn: OutputFn,
    chunk_size: int = 16,
    method: Method = "auto",
) -> Iterator[Tensor]:
    """Yield per-sample gradients chunk by chunk, ``(b, p, d)`` each, ``b <= chunk_size``.

    Memory stays at one chunk of gradients, so this is the way to feed a large set to
    :mod:`cadalign.similarity.density` (wrap it in a ``lambda`` for the two-pass functions).

    Args:
        model: The network.
        params: ``(name, parameter)`` pairs to differentiate.
        inputs: Batched input tensors (may stay on the CPU).
        output_fn: Maps the model output to a ``(B, d)`` tensor.
        chunk_size: Samples per chunk.
        method: See :func:`per_sample_grads`.

    Yields:
        Gradient chunks in sample order.

    Raises:
        ValueError: as :func:`per_sample_grads`.
    """
    batch = _check_args(model, params, inputs, chunk_size)
    for start in range(0, batch, chunk_size):
        chunk = tuple(x[start : start + chunk_size] for x in inputs)
        yield per_sample_grads(model, params, chunk, output_fn, chunk_size, method)


def per_sample_grads_loop(
    model: nn.Module, params: ParamList, inputs: tuple[Tensor, ...], output_fn: OutputFn
) -> Tensor:
    """Reference: per-sample gradients by one forward and ``d`` backward passes per sample.

    Args:
        model: The network.
        params: ``(name, parameter)`` pairs to differentiate.
        inputs: Batched input tensors, first dimension ``B``.
        output_fn: Maps the model output to a ``(B, d)`` tensor.

    Returns:
        ``(B, p, d)`` tensor.

    Raises:
        ValueError: as :func:`per_sample_grads`.
    """
    batch = _check_args(model, params, inputs, 1)
    tensors = [p for _, p in params]
    rows = []
    with _requires_grad(tensors), torch.enable_grad():
        for b in range(batch):
            y = output_fn(model(*(x[b : b + 1].to(tensors[0].device) for x in inputs)))
            d = _out_dim(y, 1)
            cols = []
            for j in range(d):
                grads = torch.autograd.grad(y[0, j], tensors, retain_graph=j < d - 1, allow_unused=True)
                cols.append(torch.cat([_flat_or_zero(g, p) for g, p in zip(grads, tensors)]))
            rows.append(torch.stack(cols, dim=1))
    return torch.stack(rows)


def _flat_or_zero(g: Tensor | None, p: Tensor) -> Tensor:
    return torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(-1)


@contextlib.contextmanager
def _requires_grad(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily make ``tensors`` require grad (restored afterwards)."""
    before = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, before):
            t.requires_grad_(flag)


def _vmap_grads(
    model: nn.Module,
    params: ParamList,
    inputs: tuple[Tensor, ...],
    output_fn: OutputFn,
    chunk_size: int,
    batch: int,
) -> Tensor:
    device = params[0][1].device
    names = [name for name, _ in params]
    values = {name: p.detach() for name, p in params}
    sizes = [p.numel() for _, p in params]

    def single(pdict: dict[str, Tensor], *sample: Tensor) -> Tensor:
        out = output_fn(functional_call(model, pdict, tuple(x.unsqueeze(0) for x in sample)))
        return out.squeeze(0)

    jac = vmap(jacrev(single), in_dims=(None, *([0] * len(inputs))))
    result: Tensor | None = None
    # Under torch.no_grad the other parameters are not tracked; torch.func transforms
    # still differentiate with respect to `values`.
    with torch.no_grad():
        for start in range(0, batch, chunk_size):
            chunk = tuple(x[start : start + chunk_size].to(device) for x in inputs)
            grads = jac(values, *chunk)  # name -> (b, d, *shape)
            b, d = grads[names[0]].shape[:2]
            if result is None:
                result = torch.empty(batch, sum(sizes), d, dtype=grads[names[0]].dtype, device=device)
            offset = 0
            for name, size in zip(names, sizes):
                block = grads[name].reshape(b, d, size).transpose(1, 2)
                result[start : start + b, offset : offset + size] = block
                offset += size
    if result is None:
        raise ValueError("inputs have batch size 0")
    return result


_HOOK_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.GroupNorm)


def _hook_layers(model: nn.Module, params: ParamList) -> dict[nn.Module, list[tuple[str, int]]]:
    """Map each layer owning selected parameters to ``[(kind, index in params)]``."""
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        if isinstance(module, _HOOK_LAYERS):
            for kind in ("weight", "bias"):
                p = getattr(module, kind, None)
                if p is not None:
                    owners[id(p)] = (module, kind)
    layers: dict[nn.Module, list[tuple[str, int]]] = {}
    for i, (name, p) in enumerate(params):
        if id(p) not in owners:
            raise UnsupportedForHooks(
                f"parameter {name!r} is not the weight/bias of a Linear, Conv2d, ConvTranspose2d "
                "or GroupNorm layer"
            )
        module, kind = owners[id(p)]
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise UnsupportedForHooks(
                f"parameter {name!r}: convolution with groups, a padding mode or string padding"
            )
        layers.setdefault(module, []).append((kind, i))
    return layers


# On CPU, a grouped convolution (one group per sample) computes per-sample weight
# gradients ~3x faster than unfold + bmm once the output map has this many pixels or
# more (measured at 114 px and 30 px); below it, and on GPUs (where the reference timing
# of the unfold + bmm formulation was taken), unfold + bmm is used.
_GROUPED_MIN_PIXELS = 256


def _conv_weight_grads(module: nn.Conv2d, inp: Tensor, gout: Tensor) -> Tensor:
    """Per-sample Conv2d weight gradients ``(b, d, Cout*Cin*kh*kw)`` from ``gout`` ``(b, d, Cout, H, W)``."""
    b, d, cout = gout.shape[:3]
    if inp.device.type == "cpu" and gout.shape[3] * gout.shape[4] >= _GROUPED_MIN_PIXELS:
        w = torch.nn.grad.conv2d_weight(
            inp.reshape(1, b * inp.shape[1], *inp.shape[2:]),
            (b * d * cout, inp.shape[1], *module.kernel_size),
            gout.reshape(1, b * d * cout, *gout.shape[3:]),
            module.stride,
            module.padding,
            module.dilation,
            groups=b,
        )
        return w.reshape(b, d, -1)
    cols = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)
    return torch.bmm(gout.reshape(b, d * cout, -1), cols.transpose(1, 2)).reshape(b, d, -1)


def _layer_grads(module: nn.Module, inp: Tensor, gout: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients ``(b, d, numel)`` of one call of a Linear/Conv2d/ConvTranspose2d/GroupNorm layer.

    Args:
        module: The layer.
        inp: Its input ``(b, ...)``.
        gout: Gradients of the ``d`` outputs with respect to its output, ``(b, d, *out_shape)``.

    Returns:
        ``{"weight": ..., "bias": ...}``.
    """
    b, d = gout.shape[:2]
    if isinstance(module, nn.GroupNorm):
        # y = xhat * w + b per channel, xhat the input normalised per sample and group
        # (no affine); recomputed here rather than kept, so the forward pass stores nothing more.
        xhat = F.group_norm(inp, module.num_groups, eps=module.eps).flatten(2)  # (b, C, L)
        g = gout.flatten(3)  # (b, d, C, L)
        return {"weight": torch.einsum("bdcl,bcl->bdc", g, xhat), "bias": g.sum(3)}
    if isinstance(module, nn.ConvTranspose2d):
        # y = conv_transpose(x, w): dy/dw[c, (o, u, v)] = sum_l x[c, l] * unfold(g)[(o, u, v), l]
        cols = F.unfold(
            gout.flatten(0, 1), module.kernel_size, module.dilation, module.padding, module.stride
        )
        cols = cols.reshape(b, d, cols.shape[1], -1)
        weight = torch.einsum("bcl,bdkl->bdck", inp.reshape(b, inp.shape[1], -1), cols)
        return {"weight": weight.reshape(b, d, -1), "bias": gout.sum((3, 4))}
    if isinstance(module, nn.Conv2d):
        return {"weight": _conv_weight_grads(module, inp, gout), "bias": gout.sum((3, 4))}
    g = gout.reshape(b, d, -1, gout.shape[-1])
    x = inp.reshape(b, -1, inp.shape[-1])
    return {"weight": torch.einsum("bdlo,bli->bdoi", g, x).reshape(b, d, -1), "bias": g.sum(2)}


def _hook_grads(
    model: nn.Module,
    params: ParamList,
    inputs: tuple[Tensor, ...],
    output_fn: OutputFn,
    chunk_size: int,
    batch: int,
) -> Tensor:
    device = params[0][1].device
    layers = _hook_layers(model, params)
    sizes = [p.numel() for _, p in params]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    tensors = [p for _, p in params]
    result: Tensor | None = None
    for start in range(0, batch, chunk_size):
        chunk = tuple(x[start : start + chunk_size].to(device) for x in inputs)
        calls: list[tuple[nn.Module, Tensor, Tensor, int]] = []

        def keep(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            calls.append((module, args[0], out, args[0]._version))
            return out.clone()  # later in-place ops act on the copy, not on the kept output

        handles = [m.register_forward_hook(keep) for m in layers]
        try:
            with _requires_grad(tensors), torch.enable_grad():
                y = output_fn(model(*chunk))
        finally:
            for h in handles:
                h.remove()
        b = chunk[0].shape[0]
        d = _out_dim(y, b)
        for module, inp, _, version in calls:
            if inp._version != version:
                raise UnsupportedForHooks(f"the input of {module} was modified in place after the layer ran")
        if result is None:
            result = torch.zeros(batch, sum(sizes), d, dtype=tensors[0].dtype, device=device)
        outs = [out for _, _, out, _ in calls]
        per_output = [
            torch.autograd.grad(y[:, j].sum(), outs, retain_graph=j < d - 1, allow_unused=True)
            for j in range(d)
        ]
        for c, (module, inp, out, _) in enumerate(calls):
            gouts = [g[c] if g[c] is not None else torch.zeros_like(out) for g in per_output]
            per_sample = _layer_grads(module, inp.detach(), torch.stack(gouts, 1))
            for kind, i in layers[module]:
                rows = slice(start, start + b)
                result[rows, offsets[i] : offsets[i] + sizes[i]] += per_sample[kind].transpose(1, 2)
    if result is None:
        raise ValueError("inputs have batch size 0")
    return result


def alignment_output_fn(mode: Literal["sum", "center"]) -> Callable[[Any], Tensor]:
    """Output map of the alignment network for the similarity analysis (``d = 2``).

    Args:
        mode: ``"sum"``: sum over the output map of each displacement component of
            ``disp[0]`` (what the reference differentiated); ``"center"``: the value at the
            centre pixel ``(O // 2, O // 2)`` (for even ``O``, the pixel below-right of the
            geometric centre).

    Returns:
        A function mapping an ``AlignOutput`` (with ``disp[0]`` of shape ``(B, 2, O, O)``)
        to a ``(B, 2)`` tensor.

    Raises:
        ValueError: for an unknown mode.
    """
    if mode == "sum":
        return lambda out: out.disp[0].sum(dim=(2, 3))
    if mode == "center":
        return lambda out: out.disp[0][:, :, out.disp[0].shape[2] // 2, out.disp[0].shape[3] // 2]
    raise ValueError(f"mode must be 'sum' or 'center', got {mode!r}")
