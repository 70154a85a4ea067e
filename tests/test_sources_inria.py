"""Tests for cadalign.sources.inria with a tiny fake dataset served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine

from cadalign.geo.tiles import write_geotiff
from cadalign.sources import http
from cadalign.sources.http import DownloadError
from cadalign.sources.inria import (
    PARTS,
    REGISTRATION_URL,
    ZIP_NAME,
    ConcatReader,
    InriaConfig,
    InriaError,
    fetch_city,
    mask_to_polygons,
)
from servers import LocalServer, Reply, serve_volumes, seven_zip, split_bytes

CRS_BY_CITY = {"austin": "EPSG:32614", "bellingham": "EPSG:32610"}
TILES = {"austin": [1, 2, 3], "bellingham": [1, 2]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fake AerialImageDataset (32x32 GeoTIFFs, real UTM CRSs), its zip and 5 7z volumes."""
    base = tmp_path_factory.mktemp("inria")
    rng = np.random.default_rng(7)
    root = base / "extracted" / "AerialImageDataset"
    for city, tiles in TILES.items():
        split = "train" if city == "austin" else "test"
        for n in tiles:
            transform = Affine(0.3, 0, 600_000 + 10 * n, 0, -0.3, 3_300_000)
            image = rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
            write_geotiff(root / split / "images" / f"{city}{n}.tif", image, transform, CRS_BY_CITY[city])
            if split == "train":
                gt = (rng.random((1, 32, 32)) > 0.7).astype(np.uint8) * 255
                write_geotiff(root / "train" / "gt" / f"{city}{n}.tif", gt, transform, CRS_BY_CITY[city])
    zip_path = base / ZIP_NAME
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(root.rglob("*.tif")):
            zf.write(path, path.relative_to(root.parent).as_posix())
    zip_bytes = zip_path.read_bytes()
    volumes = split_bytes(seven_zip({ZIP_NAME: zip_bytes}), len(PARTS))
    return {"root": root, "zip": zip_path, "md5": hashlib.md5(zip_bytes).hexdigest(), "volumes": volumes}


@pytest.fixture()
def server(dataset, monkeypatch):
    monkeypatch.setattr(http, "_sleep", lambda s: None)
    with LocalServer() as srv:
        serve_volumes(srv, PARTS, dataset["volumes"])
        yield srv


def _cfg(server, dataset, tmp_path, **kw) -> InriaConfig:
    args = {
        "base_url": server.url("/aerial/"),
        "download_dir": str(tmp_path / "dl"),
        "zip_md5": dataset["md5"],
    }
    args.update(kw)
    return InriaConfig(retries=2, backoff_s=0.0, timeout_s=10.0, **args)


def _check_copies(paths: list[Path], dataset: dict, city: str, tiles: list[int], out: Path) -> None:
    split = "train" if city == "austin" else "test"
    expected = []
    for n in tiles:
        name = f"{city}{n}.tif"
        expected.append((out / "images" / name, dataset["root"] / split / "images" / name))
        if split == "train":
            expected.append((out / "gt" / name, dataset["root"] / "train" / "gt" / name))
    assert paths == [dst for dst, _ in expected]
    for dst, src in expected:
        assert dst.read_bytes() == src.read_bytes()
    with rasterio.open(paths[0]) as tif:
        assert tif.crs.to_string() == CRS_BY_CITY[city] and tif.shape == (32, 32)


def test_full_fetch_from_server(server, dataset, tmp_path, caplog):
    cfg = _cfg(server, dataset, tmp_path)
    out = tmp_path / "out"
    _check_copies(fetch_city("austin", [1, 3], cfg, out), dataset, "austin", [1, 3], out)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["austin1.tif", "austin3.tif"]
    n_requests = len(server.requests)
    assert n_requests == len(PARTS)
    with caplog.at_level(logging.INFO, logger="cadalign.sources.inria"):
        paths = fetch_city("bellingham", [2], cfg, out)
    _check_copies(paths, dataset, "bellingham", [2], out)
    assert "test city" in caplog.text
    assert not (out / "gt" / "bellingham2.tif").exists()
    assert len(server.requests) == n_requests  # the verified zip is reused, no new download


def test_resume_after_connection_reset(server, dataset, tmp_path):
    cut = len(dataset["volumes"][2]) // 2
    server.routes[f"/aerial/{PARTS[2]}"].script.append(Reply(cut_after=cut))
    out = tmp_path / "out"
    paths = fetch_city("austin", [2], _cfg(server, dataset, tmp_path), out)
    _check_copies(paths, dataset, "austin", [2], out)
    ranges = [r.headers.get("Range") for r in server.requests_to(f"/aerial/{PARTS[2]}")]
    assert ranges == [None, f"bytes={cut}-"]


def test_wrong_checksum_removes_zip(server, dataset, tmp_path):
    wrong = "0" * 32
    cfg = _cfg(server, dataset, tmp_path, zip_md5=wrong)
    message = rf"{ZIP_NAME}: md5 {dataset['md5']}, expected {wrong}; the bad file was deleted"
    with pytest.raises(InriaError, match=message):
        fetch_city("austin", [1], cfg, tmp_path / "out")
    assert not (tmp_path / "dl" / ZIP_NAME).exists()
    assert not (tmp_path / "out").exists()


def test_damaged_cached_zip_detected(server, dataset, tmp_path):
    cfg = _cfg(server, dataset, tmp_path)
    fetch_city("austin", [1], cfg, tmp_path / "out")
    cached = tmp_path / "dl" / ZIP_NAME
    assert (tmp_path / "dl" / f"{ZIP_NAME}.md5ok").is_file()
    with cached.open("r+b") as fh:  # same size, one byte flipped: the md5 stamp must not vouch for it
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    stat = cached.stat()  # make the modification time differ even on a coarse-clock filesystem
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(InriaError, match="the bad file was deleted"):
        fetch_city("austin", [2], cfg, tmp_path / "out")
    assert not cached.exists()
    # the volumes are still there: the next call re-extracts without downloading
    n_requests = len(server.requests)
    fetch_city("austin", [2], cfg, tmp_path / "out")
    assert len(server.requests) == n_requests


def test_missing_volume_404(server, dataset, tmp_path):
    del server.routes[f"/aerial/{PARTS[3]}"]
    url = server.url(f"/aerial/{PARTS[3]}")
    with pytest.raises(DownloadError, match=rf"{url}: not found \(HTTP 404\).*{REGISTRATION_URL}"):
        fetch_city("austin", [1], _cfg(server, dataset, tmp_path), tmp_path / "out")


@pytest.mark.parametrize("which", ["dataset_dir", "parent_dir", "zip"])
def test_root_needs_no_network(server, dataset, tmp_path, which):
    roots = {"dataset_dir": dataset["root"], "parent_dir": dataset["root"].parent, "zip": dataset["zip"]}
    root = roots[which]
    cfg = _cfg(server, dataset, tmp_path, root=str(root))
    out = tmp_path / "out"
    _check_copies(fetch_city("austin", [3, 1], cfg, out), dataset, "austin", [3, 1], out)
    assert server.requests == []


def test_root_zip_bad_md5_is_kept(server, dataset, tmp_path):
    cfg = _cfg(server, dataset, tmp_path, root=str(dataset["zip"]), zip_md5="1" * 32)
    with pytest.raises(InriaError, match=r"md5 .* expected 1{32}\. If the download"):
        fetch_city("austin", [1], cfg, tmp_path / "out")
    assert dataset["zip"].is_file()  # the user's own file is never deleted


def test_malicious_zip_member_refused(server, dataset, tmp_path):
    bad = tmp_path / ZIP_NAME
    with zipfile.ZipFile(bad, "w") as zf:
        zf.write(dataset["root"] / "train/images/austin1.tif", "AerialImageDataset/train/images/austin1.tif")
        zf.writestr("AerialImageDataset/../../evil.tif", b"x")
    md5 = hashlib.md5(bad.read_bytes()).hexdigest()
    cfg = _cfg(server, dataset, tmp_path, root=str(bad), zip_md5=md5)
    with pytest.raises(InriaError, match=r"refusing member 'AerialImageDataset/../../evil.tif'"):
        fetch_city("austin", [1], cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malicious_7z_member_refused(server, dataset, tmp_path):
    archive = bytearray(seven_zip({ZIP_NAME: dataset["zip"].read_bytes(), "ab/evil.txt": b"x"}))
    at = archive.find("ab/evil.txt".encode("utf-16-le"))
    archive[at : at + 4] = "..".encode("utf-16-le")  # py7zr refuses to write such a name itself
    offset, size = struct.unpack("<QQ", archive[12:28])
    archive[28:32] = struct.pack("<I", zlib.crc32(archive[32 + offset : 32 + offset + size]))
    archive[8:12] = struct.pack("<I", zlib.crc32(archive[12:32]))
    for name, data in zip(PARTS, split_bytes(bytes(archive), len(PARTS)), strict=True):
        server.routes[f"/aerial/{name}"].data = data
    with pytest.raises(InriaError, match=r"refusing member '../evil.txt'"):
        fetch_city("austin", [1], _cfg(server, dataset, tmp_path), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "dl" / ZIP_NAME).exists()


def test_bad_requests(server, dataset, tmp_path):
    cfg = _cfg(server, dataset, tmp_path, root=str(dataset["root"]))
    with pytest.raises(InriaError, match=r"unknown Inria city 'paris'.*'austin'.*'bellingham'"):
        fetch_city("paris", [1], cfg, tmp_path)
    with pytest.raises(InriaError, match=r"\[0, 37\] invalid; use integers 1..36"):
        fetch_city("austin", [0, 5, 37], cfg, tmp_path)
    with pytest.raises(InriaError, match=r"missing \['train/images/austin5.tif', 'train/gt/austin5.tif'\]"):
        fetch_city("austin", [5], cfg, tmp_path)
    with pytest.raises(FileNotFoundError, match="inria.root .*nowhere does not exist"):
        fetch_city("austin", [1], _cfg(server, dataset, tmp_path, root=str(tmp_path / "nowhere")), tmp_path)
    with pytest.raises(InriaError, match="set inria.root .* or download.inria.dir"):
        fetch_city("austin", [1], InriaConfig(), tmp_path)
    with pytest.raises(ValueError, match="zip_md5 'abc'"):
        InriaConfig(zip_md5="abc").validate()


def test_concat_reader_matches_concatenation(tmp_path):
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 256, size=int(s), dtype=np.uint8).tobytes() for s in (7, 1, 30, 0, 12)]
    paths = []
    for i, chunk in enumerate(chunks):
        paths.append(tmp_path / f"v{i}")
        paths[-1].write_bytes(chunk)
    whole = b"".join(chunks)
    with io.BufferedReader(ConcatReader(paths), buffer_size=4) as reader:
        for start in rng.integers(0, len(whole), size=20):
            length = int(rng.integers(0, 40))
            reader.seek(int(start))
            assert reader.read(length) == whole[start : start + length]
        reader.seek(-5, io.SEEK_END)
        assert reader.read() == whole[-5:]


def test_mask_to_polygons_round_trip():
    rng = np.random.default_rng(11)
    mask = np.zeros((96, 96), np.uint8)
    yy, xx = np.mgrid[:96, :96]
    for _ in range(6):
        r0, c0 = rng.integers(0, 80, size=2)
        h, w = rng.integers(6, 20, size=2)
        mask[r0 : r0 + h, c0 : c0 + w] = 255
    mask[((yy - 60) ** 2 + (xx - 30) ** 2 < 15**2) & ((yy - 60) ** 2 + (xx - 30) ** 2 >= 6**2)] = 255
    polygons = mask_to_polygons(mask, tolerance_px=1.0)
    back = rasterio.features.rasterize(list(polygons), out_shape=mask.shape) > 0
    truth = mask == 255
    assert (back & truth).sum() / (back | truth).sum() > 0.95
    ring = [p for p in polygons if p.contains(shapely.Point(30.5, 60.5))]
    assert any(len(p.interiors) for p in polygons)  # the ring keeps its hole
    assert not ring  # the hole's centre is outside every polygon
    exact = mask_to_polygons(mask, tolerance_px=0)
    assert sum(p.area for p in exact) == truth.sum()


def test_mask_to_polygons_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"only 0 and 255.*\[0, 1\]"):
        mask_to_polygons(np.eye(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="must be 2-D"):
        mask_to_polygons(np.zeros((2, 4, 4), np.uint8))


def _damaged(volume: bytes) -> bytes:
    """The same volume, same size, with 16 bytes in its middle flipped."""
    bad = bytearray(volume)
    mid = len(bad) // 2
    bad[mid : mid + 16] = bytes(b ^ 0x5A for b in bad[mid : mid + 16])
    return bytes(bad)


def _gets(server: LocalServer) -> dict[str, int]:
    return dict(Counter(r.path for r in server.requests if r.method == "GET"))


def test_damaged_volume_downloaded_again_and_replaced(server, dataset, tmp_path, caplog):
    part = PARTS[2]
    server.routes[f"/aerial/{part}"].script.append(Reply(status=200, body=_damaged(dataset["volumes"][2])))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cadalign.sources.inria"):
        paths = fetch_city("austin", [1], _cfg(server, dataset, tmp_path), out)
    _check_copies(paths, dataset, "austin", [1], out)
    # volumes 1 and 2 were compared and kept, 3 differed and was replaced; 4 and 5 were never suspected
    assert _gets(server) == {f"/aerial/{p}": n for p, n in zip(PARTS, [2, 2, 2, 1, 1], strict=True)}
    assert f"{part} differed from a fresh download: it was damaged and has been replaced" in caplog.text
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted([*PARTS, ZIP_NAME, f"{ZIP_NAME}.md5ok"])


def test_damaged_volume_on_the_server_named_after_one_download_more(server, dataset, tmp_path):
    server.routes[f"/aerial/{PARTS[2]}"].data = _damaged(dataset["volumes"][2])
    with pytest.raises(InriaError) as err:
        fetch_city("austin", [1], _cfg(server, dataset, tmp_path), tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'dl'}: the 7z archive is damaged (")
    assert "Error" in message.split("(", 1)[1]  # py7zr's own error (CRC or LZMA), not a bare traceback
    assert f"Each volume ({', '.join(PARTS)}) was downloaded again once, and the copies here now equal" in message
    assert "the damage is in the server's copy" in message and "set inria.root to the zip" in message
    assert _gets(server) == {f"/aerial/{p}": 2 for p in PARTS}  # each downloaded again exactly once
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(PARTS)  # no zip, no half copies
    assert not (tmp_path / "out").exists()


def test_first_volume_checked_on_arrival(server, dataset, tmp_path):
    route = server.routes[f"/aerial/{PARTS[0]}"]
    junk = b"<html>busy</html>".ljust(len(dataset["volumes"][0]), b" ")  # the right size, not a 7z
    route.script.append(Reply(status=200, body=junk))
    out = tmp_path / "out"
    _check_copies(fetch_city("austin", [2], _cfg(server, dataset, tmp_path), out), dataset, "austin", [2], out)
    assert _gets(server)[f"/aerial/{PARTS[0]}"] == 2
    route.script.extend([Reply(status=200, body=junk)] * 2)
    other = tmp_path / "other"
    with pytest.raises(InriaError, match=rf"{PARTS[0]}: it does not start with the 7z signature .* twice in a row"):
        fetch_city("austin", [2], _cfg(server, dataset, other), other / "out")
    assert not (other / "dl" / PARTS[0]).exists()
