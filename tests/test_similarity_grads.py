"""Tests of cadalign.similarity.grads: batched per-sample gradients against the loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from cadalign.config import from_dict, read_params
from cadalign.model import AlignNet, ModelConfig
from cadalign.similarity import grads
from cadalign.similarity.grads import (
    UnsupportedForHooks,
    alignment_output_fn,
    iter_grad_chunks,
    per_sample_grads,
    per_sample_grads_loop,
)


class FakeOutput(NamedTuple):
    disp: list[Tensor]
    seg: list[Tensor]


class FakeAlignNet(nn.Module):
    """Tiny valid-convolution net with the AlignNet interface (in-place ELU, a pool, an up-conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(6, 5, 3), nn.ELU(inplace=True), nn.Conv2d(5, 6, 3))
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.mid = nn.Conv2d(4, 4, 3)
        self.disp_head = nn.Conv2d(4, 2, 1)
        self.seg_head = nn.Conv2d(4, 3, 1)

    def forward(self, image: Tensor, polys: Tensor) -> FakeOutput:
        x = self.enc(torch.cat([image, polys], 1))
        x = torch.relu(self.mid(self.up(nn.functional.max_pool2d(x, 2))))
        return FakeOutput(disp=[torch.tanh(self.disp_head(x))], seg=[self.seg_head(x)])

    def disp_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("seg_head.")]


def _inputs(batch: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=gen, dtype=torch.float64) * 2 - 1
    polys = (torch.rand(batch, 3, size, size, generator=gen, dtype=torch.float64) > 0.7).double()
    return image, polys


@pytest.fixture()
def fake() -> FakeAlignNet:
    torch.manual_seed(0)
    return FakeAlignNet().double().eval()


@pytest.mark.parametrize("method", ["hooks", "vmap"])
@pytest.mark.parametrize("mode", ["sum", "center"])
def test_batched_equals_loop(fake: FakeAlignNet, method: str, mode: str) -> None:
    # 22 px: the first convolutions have >= 256 output pixels (grouped-convolution branch
    # of the hooks path on CPU), the real-network test below covers the unfold branch.
    inputs = _inputs(5, 22, seed=1)
    params = fake.disp_parameters()
    fn = alignment_output_fn(mode)  # type: ignore[arg-type]
    expected = per_sample_grads_loop(fake, params, inputs, fn)
    got = per_sample_grads(fake, params, inputs, fn, chunk_size=2, method=method)  # type: ignore[arg-type]
    assert got.shape == (5, sum(p.numel() for _, p in params), 2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 0


def test_loop_matches_autograd_of_one_sample(fake: FakeAlignNet) -> None:
    """Independent check of the reference: torch.autograd.functional.jacobian on sample 0."""
    image, polys = _inputs(2, 14, seed=2)
    params = fake.disp_parameters()
    fn = alignment_output_fn("sum")
    loop = per_sample_grads_loop(fake, params, (image, polys), fn)
    names = [n for n, _ in params]

    def out_of(*values: Tensor) -> Tensor:
        state = dict(zip(names, values))
        return fn(torch.func.functional_call(fake, state, (image[:1], polys[:1])))[0]

    jac = torch.autograd.functional.jacobian(out_of, tuple(p.detach() for _, p in params))
    flat = torch.cat([j.reshape(2, -1) for j in jac], 1).T
    torch.testing.assert_close(loop[0], flat)


def test_other_parameters_do_not_change(fake: FakeAlignNet) -> None:
    inputs = _inputs(3, 14, seed=3)
    only_head = [(n, p) for n, p in fake.named_parameters() if n.startswith("disp_head.")]
    got = per_sample_grads(fake, only_head, inputs, alignment_output_fn("sum"))
    full = per_sample_grads(fake, fake.disp_parameters(), inputs, alignment_output_fn("sum"))
    offset = sum(p.numel() for n, p in fake.disp_parameters() if not n.startswith("disp_head."))
    torch.testing.assert_close(got, full[:, offset:])
    assert all(p.grad is None for p in fake.parameters())


def test_unsupported_layer_falls_back_to_vmap() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    params = list(net.named_parameters())
    with pytest.raises(UnsupportedForHooks, match="1.weight"):
        per_sample_grads(net, params, (x,), lambda y: y, method="hooks")
    auto = per_sample_grads(net, params, (x,), lambda y: y, chunk_size=3)
    torch.testing.assert_close(auto, per_sample_grads_loop(net, params, (x,), lambda y: y))


def test_refuses_training_mode_with_dropout_and_bad_arguments() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="model.eval"):
        per_sample_grads(net, list(net.named_parameters()), (x,), lambda y: y)
    net.eval()
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(net, list(net.named_parameters()), (x,), lambda y: y, chunk_size=0)
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        per_sample_grads(net, list(net.named_parameters()), (x,), lambda y: y[:, 0])
    with pytest.raises(ValueError, match="mode"):
        alignment_output_fn("mean")  # type: ignore[arg-type]


def test_center_output_picks_the_centre_pixel() -> None:
    disp = torch.arange(2 * 2 * 5 * 5, dtype=torch.float64).reshape(2, 2, 5, 5)
    out = FakeOutput(disp=[disp], seg=[])
    torch.testing.assert_close(alignment_output_fn("center")(out), disp[:, :, 2, 2])
    torch.testing.assert_close(alignment_output_fn("sum")(out), disp.sum((2, 3)))


def test_real_alignnet_tiny() -> None:
    model_mod = pytest.importorskip("cadalign.model")
    torch.manual_seed(2)
    cfg = model_mod.ModelConfig(image_widths=(3, 4, 5), poly_widths=(2, 2, 3), deep_supervision_levels=2)
    net = model_mod.AlignNet(cfg).double().eval()
    size = net.input_size(2)
    inputs = _inputs(3, size, seed=4)
    params = net.disp_parameters()
    assert not any(n.startswith(("seg_heads.", "disp_heads.1.")) for n, _ in params)
    fn = alignment_output_fn("sum")
    expected = per_sample_grads_loop(net, params, inputs, fn)
    for method in ("hooks", "vmap"):
        got = per_sample_grads(net, params, inputs, fn, chunk_size=2, method=method)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected)


def test_iter_grad_chunks_streams_the_same_gradients(fake: FakeAlignNet) -> None:
    inputs = _inputs(5, 14, seed=5)
    params = fake.disp_parameters()
    fn = alignment_output_fn("center")
    chunks = list(iter_grad_chunks(fake, params, inputs, fn, chunk_size=2))
    assert [c.shape[0] for c in chunks] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(chunks), per_sample_grads(fake, params, inputs, fn))


def _study_net(dtype: torch.dtype) -> AlignNet:
    """The network the study analyses: train.model of the repository's params.yaml."""
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    cfg = from_dict(ModelConfig, read_params(params)["train"]["model"], where=f"{params}: train.model")
    assert cfg.norm == "group"  # the case the hooks must cover
    with torch.random.fork_rng():
        torch.manual_seed(3)
        net = AlignNet(cfg).to(dtype).eval()
    with torch.no_grad():  # trained-like affine GroupNorm parameters, not the 1 / 0 of a fresh net
        for module in net.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return net


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("mode", ["center", "sum"])
def test_hooks_equal_vmap_on_the_study_network_with_groupnorm(
    dtype: torch.dtype, tol: float, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = _study_net(dtype)
    size = net.input_size(6)  # a small patch: the widths and GroupNorm groups are the study's
    image, polys = _inputs(3, size, seed=6)
    inputs = (image.to(dtype), polys.to(dtype))
    params = net.disp_parameters()
    norm_params = {id(m.weight) for m in net.modules() if isinstance(m, nn.GroupNorm)}
    assert norm_params <= {id(p) for _, p in params}  # GroupNorm's affine parameters are differentiated
    fn = alignment_output_fn(mode)  # type: ignore[arg-type]
    want = per_sample_grads(net, params, inputs, fn, chunk_size=2, method="vmap")

    def no_vmap(*args: object) -> Tensor:
        raise AssertionError("auto fell back to vmap")

    monkeypatch.setattr(grads, "_vmap_grads", no_vmap)  # auto must take the hooks path
    got = per_sample_grads(net, params, inputs, fn, chunk_size=2, method="auto")
    scale = want.abs().max()
    assert got.dtype == dtype and scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(scale))


@pytest.mark.usefixtures("one_thread")
def test_bench_tiny_measures_the_study_network(tmp_path: Path) -> None:
    """The quick check other scripts run (``--tiny --json``): the study's network, figures as JSON."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_similarity", root / "bench" / "bench_similarity.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    out = tmp_path / "out.json"
    bench.main(["--tiny", "--patch", "60", "--params", str(root / "params.yaml"), "--device", "cpu", "--json", str(out)])
    figures = json.loads(out.read_text())
    study = read_params(root / "params.yaml")
    assert figures["model_config"]["norm"] == study["train"]["model"]["norm"]
    assert list(figures["model_config"]["image_widths"]) == study["train"]["model"]["image_widths"]
    assert figures["mode"] == study["similarity"]["output"] and figures["patch"] == 60  # the smallest valid input
    assert set(figures["patches_per_second"]) == {"train_step", "hooks@4", "vmap@4", "loop"}
    assert all(v > 0 for v in figures["patches_per_second"].values())
    assert figures["agreement"]["hooks_vs_vmap"] < 1e-5 and figures["agreement"]["hooks_vs_loop"] < 1e-4
