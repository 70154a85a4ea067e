"""Tests for cadalign.sources.http against a local server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import urllib.request

import numpy as np
import pytest

from cadalign.sources import http
from cadalign.sources.http import ChecksumError, DownloadError, download, parse_retry_after, request_bytes
from servers import LocalServer, Reply, Route


@pytest.fixture()
def payload() -> bytes:
    return np.random.default_rng(0).integers(0, 256, size=50_000, dtype=np.uint8).tobytes()


@pytest.fixture()
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(http, "_sleep", recorded.append)
    return recorded


@pytest.fixture()
def server():
    with LocalServer() as srv:
        yield srv


def test_full_download_with_md5(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload))
    md5 = hashlib.md5(payload).hexdigest()
    dest = download(server.url("/f.bin"), tmp_path / "f.bin", md5=md5, chunk=4096)
    assert dest.read_bytes() == payload
    assert not (tmp_path / "f.bin.part").exists()
    assert waits == []


def test_resume_after_reset_uses_range(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload, script=[Reply(cut_after=20_000), Reply(cut_after=10_000)]))
    dest = download(server.url("/f.bin"), tmp_path / "f.bin", backoff_s=0.5, chunk=1024)
    assert dest.read_bytes() == payload
    ranges = [r.headers.get("Range") for r in server.requests_to("/f.bin")]
    assert ranges == [None, "bytes=20000-", "bytes=30000-"]
    # each attempt made progress, so the backoff never grows past its first step
    assert waits == [0.5, 0.5]


def test_resume_after_tcp_reset(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload, script=[Reply(cut_after=25_000, reset=True)]))
    md5 = hashlib.md5(payload).hexdigest()
    dest = download(server.url("/f.bin"), tmp_path / "f.bin", md5=md5, backoff_s=0)
    assert dest.read_bytes() == payload
    assert len(server.requests_to("/f.bin")) == 2


def test_server_ignoring_range_restarts_from_zero(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload, range_support=False, script=[Reply(cut_after=12_345)]))
    md5 = hashlib.md5(payload).hexdigest()
    dest = download(server.url("/f.bin"), tmp_path / "f.bin", md5=md5, backoff_s=0)
    assert dest.read_bytes() == payload


def test_partial_file_is_never_final(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload, script=[Reply(cut_after=1000)]))
    # retries 0: the one attempt brought 1000 bytes, and the message says so
    message = r"giving up after 1 attempt\(s\) \(0 retries .*\); 1000 bytes received so far.*partial file .*f.bin.part is kept"
    with pytest.raises(DownloadError, match=message):
        download(server.url("/f.bin"), tmp_path / "f.bin", retries=0, backoff_s=0)
    assert not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").stat().st_size == 1000
    # a later call resumes from the partial file
    download(server.url("/f.bin"), tmp_path / "f.bin", backoff_s=0)
    assert (tmp_path / "f.bin").read_bytes() == payload
    assert server.requests_to("/f.bin")[-1].headers.get("Range") == "bytes=1000-"


def test_retry_on_5xx_and_429_honours_retry_after(server, payload, tmp_path, waits):
    script = [Reply(status=503), Reply(status=429, headers={"Retry-After": "7"}), Reply(status=502)]
    server.add("/f.bin", Route(data=payload, script=script))
    download(server.url("/f.bin"), tmp_path / "f.bin", backoff_s=0.25)
    assert (tmp_path / "f.bin").read_bytes() == payload
    assert waits == [0.25, 7.0, 1.0]  # exponential, then Retry-After, then exponential again


def test_retries_exhausted(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload, script=[Reply(status=500)] * 5))
    with pytest.raises(DownloadError, match=r"/f.bin: giving up after 3 attempt\(s\).*; 0 bytes received so far; .*HTTP 500"):
        download(server.url("/f.bin"), tmp_path / "f.bin", retries=2, backoff_s=1)
    assert waits == [1, 2]
    assert not (tmp_path / "f.bin").exists()


def test_wrong_md5_removes_file(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload))
    wrong = "0" * 32
    actual = hashlib.md5(payload).hexdigest()
    with pytest.raises(ChecksumError, match=rf"f.bin: md5 mismatch.*expected {wrong}, got {actual}.*deleted"):
        download(server.url("/f.bin"), tmp_path / "f.bin", md5=wrong)
    assert list(tmp_path.iterdir()) == []


def test_404_names_url_and_hint(server, tmp_path, waits):
    url = server.url("/missing.bin")
    with pytest.raises(DownloadError, match=rf"{url}: not found \(HTTP 404\).*download it by hand"):
        download(url, tmp_path / "m.bin", hint="download it by hand")
    assert len(server.requests_to("/missing.bin")) == 1  # a 404 is not retried
    assert waits == []


def test_existing_file_reused_or_replaced(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload))
    dest = tmp_path / "f.bin"
    dest.write_bytes(payload)
    download(server.url("/f.bin"), dest, md5=hashlib.md5(payload).hexdigest())
    assert server.requests == []
    dest.write_bytes(b"stale")
    download(server.url("/f.bin"), dest, md5=hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload


def test_complete_part_file_416(server, payload, tmp_path, waits):
    server.add("/f.bin", Route(data=payload))
    (tmp_path / "f.bin.part").write_bytes(payload)
    download(server.url("/f.bin"), tmp_path / "f.bin", md5=hashlib.md5(payload).hexdigest())
    assert (tmp_path / "f.bin").read_bytes() == payload


def test_request_bytes_post_and_retry(server, waits):
    server.add("/api", Route(data=b'{"ok": 1}', script=[Reply(status=504)]))
    req = urllib.request.Request(server.url("/api"), data=b"data=abc", method="POST")
    assert request_bytes(req, backoff_s=0.1) == b'{"ok": 1}'
    assert [r.body for r in server.requests_to("/api")] == [b"data=abc", b"data=abc"]
    assert waits == [0.1]


def test_parse_retry_after():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
