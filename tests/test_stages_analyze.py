"""End-to-end tests of the analyze stage (similarity of a round's network) on a tiny seeded city."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from cadalign.config import ConfigError, load_section
from cadalign.geo.labels import load_labelled_tiles
from cadalign.similarity.grads import alignment_output_fn, per_sample_grads_loop
from cadalign.similarity.kernels import k_rot, k_trace, normalized_kernel
from cadalign.stages import analyze
from cadalign.train import load_model, save_model
from studies import SIM_GOOD, SIM_MARGIN, SIM_PARAMS, SIM_SIZE, read_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patch_set_is_the_same_for_two_label_sets(similarity_study: dict[str, Path]) -> None:
    truth = load_labelled_tiles(similarity_study["cities"], similarity_study["truth"], ["tinytown"])
    labels = {r: load_labelled_tiles(similarity_study["cities"], similarity_study[r], ["tinytown"]) for r in ("round0", "round1")}
    a, b = (analyze.build_patch_set(truth, labels[r], 1, SIM_SIZE, SIM_MARGIN, 10, 0, 3.0) for r in labels)
    assert [tuple(c) for c in a.corners] == SIM_GOOD * 2  # the crossing box's window is left out
    assert a.tiles.tolist() == ["tinytown1"] * 3 + ["tinytown2"] * 3
    np.testing.assert_array_equal(a.corners, b.corners)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.polys, b.polys)  # rasters come from each round's labels
    image, polys = a.network_inputs()
    assert image.shape == (6, 3, SIM_SIZE, SIM_SIZE) and float(image.min()) >= -1 and float(image.max()) <= 1
    few = analyze.build_patch_set(truth, labels["round0"], 1, SIM_SIZE, SIM_MARGIN, 2, 0, 3.0)
    assert len(few.corners) == 4 and {tuple(c) for c in few.corners} <= set(SIM_GOOD)


def test_stage_outputs_equal_brute_force(similarity_study: dict[str, Path]) -> None:
    out = similarity_study["out1"]
    files = {"counts.csv", "metrics.json", "query_hist.csv", "neighbours.csv"}
    files |= {"ns_hist.png", "neighbours.png"}
    assert {p.name for p in out.iterdir()} == files
    rows = read_rows(out / "counts.csv")
    want = [(t, x, y) for t in ("tinytown1", "tinytown2") for x, y in SIM_GOOD]
    assert [(r["tile"], int(r["x0"]), int(r["y0"])) for r in rows] == want
    # Independent: the per-sample loop and pairwise normalised kernels on the same patches.
    truth = load_labelled_tiles(similarity_study["cities"], similarity_study["truth"], ["tinytown"])
    labels = load_labelled_tiles(similarity_study["cities"], similarity_study["round0"], ["tinytown"])
    patches = analyze.build_patch_set(truth, labels, 1, SIM_SIZE, SIM_MARGIN, 10, 0, 3.0)
    net = load_model(similarity_study["root"] / "models" / "round1" / "ds1.pt")
    out_fn = alignment_output_fn("sum")
    g = per_sample_grads_loop(net, net.disp_parameters(), patches.network_inputs(), out_fn).double()
    kernels = normalized_kernel(g[:, None], g[None, :])
    kc, krot = k_trace(kernels).numpy(), k_rot(kernels).numpy()
    np.testing.assert_allclose([float(r["N_S"]) for r in rows], kc.sum(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([float(r["N_S_rot"]) for r in rows], krot.sum(1), rtol=1e-4, atol=1e-4)
    far = np.abs(krot - 0.9) > 1e-4  # decisions away from the threshold only
    for r, want, sure in zip(rows, (krot >= 0.9).sum(1), far.all(1), strict=True):
        assert int(float(r["N_tau_rot_0.9"])) == want or not sure
    assert list(rows[0])[5:] == [
        "N_S", "N_tau_0.5", "N_tau_0.9", "N_alpha_1", "N_alpha_2",
        "N_S_rot", "N_tau_rot_0.5", "N_tau_rot_0.9", "N_alpha_rot_1", "N_alpha_rot_2", "zero_gradient", "query",
    ]
    np.testing.assert_allclose(np.diag(kc), 1.0, atol=1e-6)
    queries = [int(r["patch"]) for r in rows if r["query"] == "1"]
    assert len(queries) == 4
    for r in read_rows(out / "neighbours.csv"):
        q, nb = int(r["query"]), int(r["neighbour"])
        assert nb != q
        assert float(r["k_c"]) == pytest.approx(kc[q, nb], abs=1e-5)
    hist = read_rows(out / "query_hist.csv")
    assert len(hist) == 4 * 100
    for q in queries:
        inside = [kc[q, j] for j in range(6) if j != q and 0 <= kc[q, j] <= 1]
        assert sum(int(r["count"]) for r in hist if int(r["query"]) == q) == len(inside)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patches"] == 6 and metrics["output"] == "sum"
    assert metrics["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert metrics["N_S_median"] == pytest.approx(np.median(kc.sum(1)), abs=1e-4)
    assert metrics["N_S_rot_median"] == pytest.approx(np.median(krot.sum(1)), abs=1e-4)
    assert metrics["N_S_rot_mean"] == pytest.approx(krot.sum(1).mean(), abs=1e-4)
    assert metrics["n_zero_gradient"] == 0 and metrics["ns_pairwise_max_abs_diff"] < 1e-10
    assert metrics["wall_seconds"] > 0 and metrics["peak_memory_bytes"] > 0
    for name in ("ns_hist.png", "neighbours.png"):
        assert matplotlib.image.imread(out / name).ndim == 3


def test_round_without_model_fails_clearly(similarity_study: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no network .*ds1\.pt for round round9; run its train"):
        analyze.main(
            ["--params", str(similarity_study["params"]), "--round", "round9", "--cities-dir", str(similarity_study["cities"]),
             "--truth", str(similarity_study["truth"]), "--labels", str(similarity_study["round0"]),
             "--models", str(tmp_path / "none"),
             "--out", str(tmp_path / "out")]
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("ds: 1", "ds: 8"), r"similarity.ds = 8 is not trained in every round .*share \[2, 1\]"),
        # a network that some round does not train cannot be compared across rounds
        (("factors: [2, 1]", "factors: [2, 1]\n  round_factors: {round3: [1]}\n"), r"similarity.ds = 2 is not trained .*share \[1\]"),
        (("factors: [2, 1]", "factors: [2, 1]\n  round_factors: {round3: [4]}\n"), r"have no factor in common.*keep one"),
    ],
)
def test_ds_must_be_a_trained_factor(
    similarity_study: dict[str, Path], tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SIM_PARAMS.replace(*edit).replace("ds: 1", "ds: 2"))
    with pytest.raises(ValueError, match=message):
        analyze.main(
            ["--params", str(params), "--round", "round1", "--cities-dir", str(similarity_study["cities"]),
             "--truth", str(similarity_study["truth"]), "--labels", str(similarity_study["round0"]),
             "--models", str(similarity_study["root"] / "models" / "round1"), "--out", str(tmp_path / "out")]
        )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("  taus: [0.5, 0.9, 0.5]", r"params\.yaml: similarity: taus has 0\.5 twice .*list each value once"),
        ("  alphas: [1.0, 1.0000001]", r"params\.yaml: similarity: alphas has 1\.0 and 1\.0000001, equal to 6 digits"),
    ],
)
def test_repeated_thresholds_are_refused(tmp_path: Path, line: str, message: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SIM_PARAMS + line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_section(params, "similarity", analyze.SimilarityConfig)


def test_zero_gradient_patch_is_counted_and_named(
    similarity_study: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network whose centre output saturates tanh on one patch only: that patch has G = 0."""
    truth = load_labelled_tiles(similarity_study["cities"], similarity_study["truth"], ["tinytown"])
    labels = load_labelled_tiles(similarity_study["cities"], similarity_study["round0"], ["tinytown"])
    patches = analyze.build_patch_set(truth, labels, 1, SIM_SIZE, SIM_MARGIN, 10, 0, 3.0)
    net = load_model(similarity_study["root"] / "models" / "round1" / "ds1.pt")
    head = net.disp_heads[0]
    kept: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda m, args, out: kept.append(args[0]))
    with torch.no_grad():
        net(*patches.network_inputs())
    handle.remove()
    feats = kept[0][:, :, kept[0].shape[2] // 2, kept[0].shape[3] // 2].double()  # (6, C) at the centre
    dead = 2
    target = torch.zeros(len(feats), dtype=torch.float64)
    target[dead] = 30.0  # tanh(30) == 1 in float32: its derivative, so the whole gradient, is 0
    design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    assert torch.allclose(design @ solution, target, atol=1e-6)  # the other patches stay at z = 0
    with torch.no_grad():
        head.weight.copy_(solution[:-1].float().view(1, -1, 1, 1).expand_as(head.weight))
        head.bias.fill_(float(solution[-1]))
    models = tmp_path / "models"
    save_model(net, models / "ds1.pt")
    params = tmp_path / "params.yaml"
    params.write_text(SIM_PARAMS + "  output: center\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        analyze.main(
            ["--params", str(params), "--round", "round1", "--cities-dir", str(similarity_study["cities"]),
             "--truth", str(similarity_study["truth"]), "--labels", str(similarity_study["round0"]),
             "--models", str(models), "--out", str(out)]
        )
    assert "round1: 1 of 6 patches have a zero output gradient" in caplog.text
    assert "#2 tinytown/tinytown1 (0, 32)" in caplog.text
    rows = read_rows(out / "counts.csv")
    assert [r["zero_gradient"] for r in rows] == ["1" if i == dead else "0" for i in range(6)]
    assert float(rows[dead]["N_S"]) == 1.0 and float(rows[dead]["N_S_rot"]) == 1.0  # itself only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_zero_gradient"] == 1
    text = "".join((out / name).read_text() for name in ("counts.csv", "neighbours.csv", "metrics.json"))
    assert not re.search(r"\b(nan|-?inf|-?infinity)\b", text, re.IGNORECASE)
