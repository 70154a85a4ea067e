"""End-to-end tests of the similarity@round and compare stages on a tiny seeded city."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import shapely
import torch

from cadalign.geo.labels import load_labelled_tiles
from cadalign.geo.polygons import from_pixels, geometry_array, write_polygons
from cadalign.geo.tiles import read_info
from cadalign.model import AlignNet, ModelConfig
from cadalign.similarity.grads import alignment_output_fn, per_sample_grads_loop
from cadalign.similarity.kernels import k_trace, normalized_kernel
from cadalign.stages import analyze, compare
from cadalign.train import load_model
from conftest import write_tiny_city

MODEL = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)
PARAMS = """
cities:
  tinytown: {source: synthetic, tiles: [1, 2]}
train:
  factors: [2, 1]
  input_size: 40
  model: {image_widths: [4, 8], poly_widths: [2, 4], deep_supervision_levels: 1}
similarity:
  ds: 1
  patch_size: 33       # not a valid input: rounded to 32 (output 8, margin 12)
  patches_per_tile: 10
  n_queries: 4
  k: 2
  chunk_size: 4
  device: cuda         # absent in CI: falls back to the CPU with a warning
"""
SIZE, MARGIN = 32, 12
# Windows of a 64 px tile at ds 1: (0,0), (32,0), (0,32) get a 4 px box inside their output
# region [12, 20]; (32,32) only a box crossing its output border, so it is not analysed.
GOOD = [(0, 0), (32, 0), (0, 32)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _truth_geoms() -> np.ndarray:
    boxes = [shapely.box(x + 14, y + 14, x + 18, y + 18) for x, y in GOOD]
    return geometry_array(boxes + [shapely.box(40, 40, 60, 60)])


def _write_labels(root: Path, cities: Path, shift: tuple[float, float]) -> Path:
    for image in sorted((cities / "tinytown" / "images").glob("*.tif")):
        info = read_info(image)
        geoms = shapely.transform(_truth_geoms(), lambda xy: xy + shift)
        ids = np.arange(len(geoms), dtype=np.int64)
        gdf_args = from_pixels(geoms, ids, info.transform, info.crs)
        write_polygons(root / "tinytown" / f"{image.stem}.gpkg", *gdf_args)
    return root


def _save_net(path: Path, seed: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = AlignNet(MODEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "config": dataclasses.asdict(MODEL)}, path)


def _run_round(s: dict[str, Path], name: str, labels: str) -> Path:
    out = s["root"] / "similarity" / name
    analyze.main(
        ["--params", str(s["params"]), "--round", name, "--cities-dir", str(s["cities"]),
         "--truth", str(s["truth"]),
         "--labels", str(s[labels]), "--models", str(s["root"] / "models" / name), "--out", str(out)]
    )
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sim")
    cities = write_tiny_city(root / "cities").parent
    params = root / "params.yaml"
    params.write_text(PARAMS)
    s = {
        "root": root,
        "params": params,
        "cities": cities,
        "truth": _write_labels(root / "truth", cities, (0.0, 0.0)),
        "round0": _write_labels(root / "labels" / "round0", cities, (3.0, -3.0)),  # off the outputs
        "round1": _write_labels(root / "labels" / "round1", cities, (-0.5, 0.5)),
    }
    _save_net(root / "models" / "round1" / "ds1.pt", 0)
    _save_net(root / "models" / "round2" / "ds1.pt", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    s["out1"] = _run_round(s, "round1", "round0")
    s["out2"] = _run_round(s, "round2", "round1")
    torch.set_num_threads(before)
    s["compare"] = root / "similarity" / "compare"
    compare.main(
        ["--rounds", f"round1={s['out1']}", f"round2={s['out2']}", "--out", str(s["compare"]),
         "--queries", "2"]
    )
    return s


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_patch_set_is_the_same_for_two_label_sets(study: dict[str, Path]) -> None:
    truth = load_labelled_tiles(study["cities"], study["truth"], ["tinytown"])
    labels = {r: load_labelled_tiles(study["cities"], study[r], ["tinytown"]) for r in ("round0", "round1")}
    a, b = (analyze.build_patch_set(truth, labels[r], 1, SIZE, MARGIN, 10, 0, 3.0) for r in labels)
    assert [tuple(c) for c in a.corners] == GOOD * 2  # the crossing box's window is left out
    assert a.tiles.tolist() == ["tinytown1"] * 3 + ["tinytown2"] * 3
    np.testing.assert_array_equal(a.corners, b.corners)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.polys, b.polys)  # rasters come from each round's labels
    image, polys = a.network_inputs()
    assert image.shape == (6, 3, SIZE, SIZE) and float(image.min()) >= -1 and float(image.max()) <= 1
    few = analyze.build_patch_set(truth, labels["round0"], 1, SIZE, MARGIN, 2, 0, 3.0)
    assert len(few.corners) == 4 and {tuple(c) for c in few.corners} <= set(GOOD)


def test_stage_outputs_equal_brute_force(study: dict[str, Path]) -> None:
    out = study["out1"]
    files = {"counts.csv", "metrics.json", "query_hist.csv", "neighbours.csv"}
    files |= {"ns_hist.png", "neighbours.png"}
    assert {p.name for p in out.iterdir()} == files
    rows = _read(out / "counts.csv")
    want = [(t, x, y) for t in ("tinytown1", "tinytown2") for x, y in GOOD]
    assert [(r["tile"], int(r["x0"]), int(r["y0"])) for r in rows] == want
    # Independent: the per-sample loop and pairwise normalised kernels on the same patches.
    truth = load_labelled_tiles(study["cities"], study["truth"], ["tinytown"])
    labels = load_labelled_tiles(study["cities"], study["round0"], ["tinytown"])
    patches = analyze.build_patch_set(truth, labels, 1, SIZE, MARGIN, 10, 0, 3.0)
    net = load_model(study["root"] / "models" / "round1" / "ds1.pt")
    out_fn = alignment_output_fn("sum")
    g = per_sample_grads_loop(net, net.disp_parameters(), patches.network_inputs(), out_fn).double()
    kc = k_trace(normalized_kernel(g[:, None], g[None, :])).numpy()
    np.testing.assert_allclose([float(r["N_S"]) for r in rows], kc.sum(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.diag(kc), 1.0, atol=1e-6)
    queries = [int(r["patch"]) for r in rows if r["query"] == "1"]
    assert len(queries) == 4
    for r in _read(out / "neighbours.csv"):
        q, nb = int(r["query"]), int(r["neighbour"])
        assert nb != q
        assert float(r["k_c"]) == pytest.approx(kc[q, nb], abs=1e-5)
    hist = _read(out / "query_hist.csv")
    assert len(hist) == 4 * 100
    for q in queries:
        inside = [kc[q, j] for j in range(6) if j != q and 0 <= kc[q, j] <= 1]
        assert sum(int(r["count"]) for r in hist if int(r["query"]) == q) == len(inside)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patches"] == 6 and metrics["output"] == "sum"
    assert metrics["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert metrics["N_S_median"] == pytest.approx(np.median(kc.sum(1)), abs=1e-4)
    assert metrics["wall_seconds"] > 0 and metrics["peak_memory_bytes"] > 0
    for name in ("ns_hist.png", "neighbours.png"):
        assert matplotlib.image.imread(out / name).ndim == 3


def test_compare_overlays_all_rounds(study: dict[str, Path]) -> None:
    out = study["compare"]
    rows = _read(out / "summary.csv")
    assert [r["round"] for r in rows] == ["round1", "round2"]
    per_round = [json.loads((study[k] / "metrics.json").read_text()) for k in ("out1", "out2")]
    assert [float(r["N_S_median"]) for r in rows] == pytest.approx([m["N_S_median"] for m in per_round])
    assert set(json.loads((out / "metrics.json").read_text())) == {"round1", "round2"}
    folders = {"round1": "out1", "round2": "out2", "round3": "out1"}
    rounds = {n: compare.load_round(study[k]) for n, k in folders.items()}
    fig = compare.ns_distribution_figure({n: r.n_s for n, r in rounds.items()}, 6)
    assert [len(ax.lines) for ax in fig.axes[:1]] == [3]
    hists = {n: r.hist for n, r in rounds.items()}
    fig = compare.query_hist_figure(hists, rounds["round1"].queries.tolist(), 2)
    assert len(fig.axes[0].patches) == 3  # one step outline per round
    for name in ("ns_distribution.png", "query_hist.png"):
        assert matplotlib.image.imread(out / name).ndim == 3


def test_compare_refuses_other_patches(study: dict[str, Path]) -> None:
    one = compare.load_round(study["out1"])
    other = dataclasses.replace(one, patches=one.patches[::-1])
    with pytest.raises(ValueError, match="other patches"):
        compare.check_same_patches({"round1": one, "round2": other})


def test_round_without_model_fails_clearly(study: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no network .*ds1\.pt for round round9; run its train"):
        analyze.main(
            ["--params", str(study["params"]), "--round", "round9", "--cities-dir", str(study["cities"]),
             "--truth", str(study["truth"]), "--labels", str(study["round0"]),
             "--models", str(tmp_path / "none"),
             "--out", str(tmp_path / "out")]
        )
    assert not (tmp_path / "out").exists()


def test_ds_must_be_a_trained_factor(study: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.replace("ds: 1", "ds: 8"))
    with pytest.raises(ValueError, match=r"similarity.ds = 8 is not one of train.factors"):
        analyze.main(
            ["--params", str(params), "--round", "round1", "--cities-dir", str(study["cities"]),
             "--truth", str(study["truth"]), "--labels", str(study["round0"]),
             "--models", str(study["root"] / "models" / "round1"), "--out", str(tmp_path / "out")]
        )
