"""End-to-end tests of the analyze stage (similarity of a round's network) on a tiny seeded city."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
import shapely
import torch

from cadalign.config import ConfigError, load_section
from cadalign.geo.labels import load_labelled_tiles
from cadalign.similarity import windows
from cadalign.similarity.grads import alignment_output_fn, per_sample_grads_loop
from cadalign.similarity.kernels import k_rot, k_trace, normalized_kernel
from cadalign.stages import analyze
from cadalign.train import load_model, save_model
from studies import SIM_GOOD, SIM_MARGIN, SIM_PARAMS, SIM_SIZE, read_rows, run_analyze

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(params: Path, **changes: object) -> analyze.SimilarityConfig:
    return dataclasses.replace(load_section(params, "similarity", analyze.SimilarityConfig), **changes)


def _patches(study: dict[str, Path], labels: str = "round0", **changes: object) -> analyze.PatchSet:
    truth = load_labelled_tiles(study["cities"], study["truth"], ["tinytown"])
    tiles = load_labelled_tiles(study["cities"], study[labels], ["tinytown"])
    return analyze.build_patch_set(truth, tiles, 1, SIM_SIZE, SIM_MARGIN, _cfg(study["params"], **changes), 3.0)


def _brute_windows(study: dict[str, Path]) -> list[tuple[str, int, int]]:
    """Every 32 px window inside a 64 px tile whose output square [x0+12, x0+20) holds a true vertex."""
    truth = load_labelled_tiles(study["cities"], study["truth"], ["tinytown"])
    out = []
    for t in truth:
        points = shapely.points(shapely.get_coordinates(t.geoms))
        for y0 in range(0, 64 - SIM_SIZE + 1):
            for x0 in range(0, 64 - SIM_SIZE + 1):
                lo, hi = SIM_MARGIN, SIM_SIZE - SIM_MARGIN
                if (x0 % (hi - lo)) or (y0 % (hi - lo)):
                    continue  # the grid of output squares starts at the tile corner
                square = shapely.box(x0 + lo, y0 + lo, x0 + hi - 1e-9, y0 + hi - 1e-9)
                if shapely.covers(square, points).any():
                    out.append((t.name, x0, y0))
    return out


def test_output_grid_covers_every_valid_window_without_overlap(similarity_study: dict[str, Path]) -> None:
    patches = _patches(similarity_study)
    got = [(t, int(x), int(y)) for t, (x, y) in zip(patches.tiles, patches.corners, strict=True)]
    assert got == _brute_windows(similarity_study)
    # no two output regions of a tile share a pixel, and every valid window of the grid was considered
    for tile in ("tinytown1", "tinytown2"):
        squares = [shapely.box(x + 12, y + 12, x + 20, y + 20) for t, x, y in got if t == tile]
        assert shapely.union_all(squares).area == pytest.approx(64 * len(squares))
    grid = windows.grid_windows(64, 64, SIM_SIZE, SIM_SIZE - 2 * SIM_MARGIN)
    assert len(grid) == 25 and grid.max() == 64 - SIM_SIZE
    capped = _patches(similarity_study, max_patches=3)
    assert len(capped.corners) == 3 and {tuple(c) for c in capped.corners} <= {(x, y) for _, x, y in got}


def test_tile_without_window_is_skipped_and_counted(similarity_study: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    truth = load_labelled_tiles(similarity_study["cities"], similarity_study["truth"], ["tinytown"])
    far = [dataclasses.replace(truth[0], geoms=shapely.transform(truth[0].geoms, lambda xy: xy * 0.1)), truth[1]]
    with caplog.at_level(logging.WARNING):
        patches = analyze.build_patch_set(far, truth, 1, SIM_SIZE, SIM_MARGIN, _cfg(similarity_study["params"]), 3.0)
    assert patches.skipped == ("tinytown/tinytown1",)
    assert set(patches.tiles) == {"tinytown2"}
    assert "1 tiles have no window with a true vertex in its output region: tinytown/tinytown1" in caplog.text


def test_patch_set_is_the_same_for_two_label_sets(similarity_study: dict[str, Path]) -> None:
    ref = {"grid": "input", "keep": "polygon", "patches_per_tile": 10}  # the reference's choice
    a, b = (_patches(similarity_study, r, **ref) for r in ("round0", "round1"))
    assert [tuple(c) for c in a.corners] == SIM_GOOD * 2  # the crossing box's window is left out
    assert a.tiles.tolist() == ["tinytown1"] * 3 + ["tinytown2"] * 3
    np.testing.assert_array_equal(a.corners, b.corners)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.polys, b.polys)  # rasters come from each round's labels
    image, polys = a.network_inputs()
    assert image.shape == (6, 3, SIM_SIZE, SIM_SIZE) and float(image.min()) >= -1 and float(image.max()) <= 1
    few = _patches(similarity_study, **{**ref, "patches_per_tile": 2})
    assert len(few.corners) == 4 and {tuple(c) for c in few.corners} <= set(SIM_GOOD)


def test_stage_outputs_equal_brute_force(similarity_study: dict[str, Path]) -> None:
    out = similarity_study["out1"]
    files = {"counts.csv", "metrics.json", "query_hist.csv", "neighbours.csv", "manifest.json"}
    files |= {"ns_hist.png", "neighbours.png", "explanation.csv", "explanation.png"}
    assert {p.name for p in out.iterdir()} == files
    rows = read_rows(out / "counts.csv")
    assert [(r["tile"], int(r["x0"]), int(r["y0"])) for r in rows] == _brute_windows(similarity_study)
    n = len(rows)
    # Independent: the per-sample loop and pairwise normalised kernels on the same patches.
    patches = _patches(similarity_study)
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
    counts = ["N_S", "N_tau_0.5", "N_tau_0.9", "N_alpha_1", "N_alpha_2"]
    assert list(rows[0])[5:] == [
        *counts, "N_S_rot", "N_tau_rot_0.5", "N_tau_rot_0.9", "N_alpha_rot_1", "N_alpha_rot_2", "zero_gradient", "query",
        *(f"raw_{c}" for c in counts), *(f"feat_{c}" for c in counts), "n_vertices", "error_before_px", "error_after_px",
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
        inside = [kc[q, j] for j in range(n) if j != q and 0 <= kc[q, j] <= 1]
        assert sum(int(r["count"]) for r in hist if int(r["query"]) == q) == len(inside)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patches"] == n and metrics["output"] == "sum"
    assert metrics["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert metrics["N_S_median"] == pytest.approx(np.median(kc.sum(1)), abs=1e-4)
    assert metrics["N_S_rot_median"] == pytest.approx(np.median(krot.sum(1)), abs=1e-4)
    assert metrics["N_S_rot_mean"] == pytest.approx(krot.sum(1).mean(), abs=1e-4)
    assert metrics["n_zero_gradient"] == 0 and metrics["ns_pairwise_max_abs_diff"] < 1e-10
    assert metrics["wall_seconds"] > 0 and metrics["peak_memory_bytes"] > 0
    for name in ("ns_hist.png", "neighbours.png", "explanation.png"):
        assert matplotlib.image.imread(out / name).ndim == 3
    # the median N_S's interval: a hand bootstrap of the patches with the stage's seed and stream
    idx = np.random.default_rng([0, 4]).integers(n, size=(200, n))
    boot = np.median(kc.sum(1)[idx], axis=1)
    assert [metrics["N_S_median_lo"], metrics["N_S_median_hi"]] == pytest.approx(np.percentile(boot, [2.5, 97.5]), abs=1e-4)


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
    patches = _patches(similarity_study, grid="input", keep="polygon")  # 6 patches: fewer than features + 1
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
    params.write_text(SIM_PARAMS + "  output: center\n  grid: input\n  keep: polygon\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        analyze.main(
            ["--params", str(params), "--round", "round1", "--cities-dir", str(similarity_study["cities"]),
             "--truth", str(similarity_study["truth"]), "--labels", str(similarity_study["round0"]),
             "--models", str(models), "--out", str(out)]
        )
    n = len(patches.corners)
    assert f"round1: 1 of {n} patches have a zero output gradient" in caplog.text
    assert f"#2 tinytown/tinytown1 ({patches.corners[2][0]}, {patches.corners[2][1]})" in caplog.text
    rows = read_rows(out / "counts.csv")
    assert [r["zero_gradient"] for r in rows] == ["1" if i == dead else "0" for i in range(n)]
    assert float(rows[dead]["N_S"]) == 1.0 and float(rows[dead]["N_S_rot"]) == 1.0  # itself only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_zero_gradient"] == 1
    text = "".join((out / name).read_text() for name in ("counts.csv", "neighbours.csv", "metrics.json"))
    assert not re.search(r"\b(nan|-?inf|-?infinity)\b", text, re.IGNORECASE)


def _label_xy(study: dict[str, Path], name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tile: the label vertices and their distance to the true vertex, in the truth's order (matched by id)."""
    truth = {t.name: t for t in load_labelled_tiles(study["cities"], study["truth"], ["tinytown"])}
    out = {}
    for t in load_labelled_tiles(study["cities"], study[name], ["tinytown"]):
        order = [int(np.flatnonzero(t.ids == i)[0]) for i in truth[t.name].ids]
        xy = shapely.get_coordinates(t.geoms[order])
        out[t.name] = (xy, np.hypot(*(xy - shapely.get_coordinates(truth[t.name].geoms)).T))
    return out


def test_explanation_equals_brute_force(similarity_study: dict[str, Path]) -> None:
    """Per-patch gains from shapely, then spearmanr, polyfit and a hand bootstrap with the stage's seed."""
    rows = read_rows(similarity_study["out1"] / "counts.csv")
    before, after = _label_xy(similarity_study, "round0"), _label_xy(similarity_study, "round1")
    gain = []
    for r in rows:
        xy, err_b = before[r["tile"]]
        x0, y0 = int(r["x0"]) + SIM_MARGIN, int(r["y0"]) + SIM_MARGIN
        inside = [i for i, (x, y) in enumerate(xy) if x0 <= x < x0 + 8 and y0 <= y < y0 + 8]
        assert int(r["n_vertices"]) == len(inside)
        if inside:
            gain.append((float(r["N_S"]), np.median(err_b[inside]), np.median(after[r["tile"]][1][inside])))
            assert float(r["error_before_px"]) == pytest.approx(gain[-1][1], rel=1e-5)
            assert float(r["error_after_px"]) == pytest.approx(gain[-1][2], rel=1e-5)
    assert len(gain) >= 3
    n_s, b, a = map(np.array, zip(*gain))
    ratio = a / b
    table = {r["method"]: r for r in read_rows(similarity_study["out1"] / "explanation.csv")}
    assert list(table) == ["gradient k^C", "gradient k^C,rot", "raw inputs (cosine)", "decoder features (cosine)"]
    grad = table["gradient k^C"]
    assert int(grad["n_patches"]) == len(gain)
    assert float(grad["spearman"]) == pytest.approx(scipy.stats.spearmanr(n_s, ratio).statistic, abs=1e-5)
    slope = np.polyfit(np.log(n_s), np.log(ratio), 1)[0]
    assert float(grad["slope"]) == pytest.approx(slope, rel=1e-3)
    idx = np.random.default_rng([0, 3]).integers(len(gain), size=(200, len(gain)))
    rhos, slopes = [], []
    for i in idx:
        if np.ptp(n_s[i]) > 0:
            rhos.append(scipy.stats.spearmanr(n_s[i], ratio[i]).statistic)
            slopes.append(np.polyfit(np.log(n_s[i]), np.log(ratio[i]), 1)[0])
    rhos = np.array(rhos)
    lo, hi = np.percentile(rhos[np.isfinite(rhos)], [2.5, 97.5])
    assert [float(grad["spearman_lo"]), float(grad["spearman_hi"])] == pytest.approx([lo, hi], abs=1e-4)
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    assert [float(grad["slope_lo"]), float(grad["slope_hi"])] == pytest.approx([lo, hi], rel=1e-3)
    metrics = json.loads((similarity_study["out1"] / "metrics.json").read_text())
    assert metrics["explain_spearman"] == pytest.approx(float(grad["spearman"]), abs=1e-5)
    assert metrics["explain_slope"] == pytest.approx(float(grad["slope"]), rel=1e-5)


def test_baselines_equal_direct_cosine(similarity_study: dict[str, Path]) -> None:
    rows = read_rows(similarity_study["out1"] / "counts.csv")
    patches = _patches(similarity_study)
    image, polys = patches.network_inputs()
    raw = np.concatenate([image.reshape(len(image), -1).numpy(), polys.reshape(len(polys), -1).numpy()], 1).astype(float)
    net = load_model(similarity_study["root"] / "models" / "round1" / "ds1.pt")
    kept = []
    handle = net.disp_heads[0].register_forward_hook(lambda m, args, out: kept.append(args[0]))
    with torch.no_grad():
        net(image, polys)
    handle.remove()
    feat = kept[0].double().mean((2, 3)).numpy()  # output: sum -> the mean over the output map
    for prefix, x in (("raw", raw), ("feat", feat)):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        cos = unit @ unit.T
        np.testing.assert_allclose([float(r[f"{prefix}_N_S"]) for r in rows], cos.sum(1), rtol=1e-5)
        np.testing.assert_allclose([float(r[f"{prefix}_N_alpha_2"]) for r in rows], (cos.clip(0) ** 2).sum(1), rtol=1e-5)
        far = (np.abs(cos - 0.9) > 1e-6).all(1)
        want = (cos >= 0.9).sum(1)
        assert all(int(float(r[f"{prefix}_N_tau_0.9"])) == w for r, w, f in zip(rows, want, far, strict=True) if f)


def test_no_vertex_in_any_output_window_fails_clearly(similarity_study: dict[str, Path], tmp_path: Path) -> None:
    s = dict(similarity_study, root=tmp_path)
    (tmp_path / "models").symlink_to(similarity_study["root"] / "models")
    from studies import _write_labels

    s["far"] = _write_labels(tmp_path / "far", s["cities"], (0.0, 9.0))  # every vertex 9 px below: off the 8 px outputs
    with pytest.raises(ValueError, match=r"no patch of tinytown/tinytown1, tinytown/tinytown2 has a vertex of .*far in "
                       r"its output window.*similarity\.patch_size"):
        run_analyze(s, "round1", "far", "round1")
    assert not (tmp_path / "similarity" / "round1").exists()
