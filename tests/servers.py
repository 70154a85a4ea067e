"""A scriptable local HTTP server for network tests (127.0.0.1, ephemeral port, a thread).

Each path gets a :class:`Route`: a static file served with (optional) ``Range`` support, and
a script of :class:`Reply` objects consumed one per request before the file is served, to
stage failures: an HTTP status with headers, or the file cut off after N bytes (the
connection is then reset, as a flaky network would). Every request is recorded.

Usage::

    with LocalServer() as srv:
        srv.add("/a.bin", Route(data=b"...", script=[Reply(status=503, headers={"Retry-After": "0"})]))
        download(srv.url("/a.bin"), dest)
        assert srv.requests[-1].headers.get("Range") is None
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import py7zr

_RANGE_RE = re.compile(r"bytes=(\d+)-$")


@dataclass
class Reply:
    """One scripted answer.

    ``status=None`` serves the route's file (honouring Range) and, with ``cut_after``,
    closes the connection after that many body bytes while announcing the full length.
    Otherwise ``status``, ``headers`` and ``body`` are sent as they are.
    """

    status: int | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None
    reset: bool = False  # cut with a TCP reset (unread bytes may be lost) instead of a clean close


@dataclass
class Route:
    """What a path serves: ``data`` (a file) after the ``script`` replies are used up."""

    data: bytes | None = None
    range_support: bool = True
    content_type: str = "application/octet-stream"
    script: list[Reply] = field(default_factory=list)


@dataclass
class Request:
    """A recorded request."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class LocalServer:
    """Threaded HTTP server on 127.0.0.1 with an OS-chosen port; a context manager."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
                return

            def do_GET(self) -> None:
                server._handle(self, b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                server._handle(self, self.rfile.read(length))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str = "/") -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def add(self, path: str, route: Route) -> Route:
        self.routes[path] = route
        return route

    def requests_to(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests.append(Request(h.command, path, dict(h.headers.items()), body))
            route = self.routes.get(path)
            reply = route.script.pop(0) if route is not None and route.script else Reply()
        if reply.status is not None:
            self._send(h, reply.status, reply.headers, reply.body)
        elif route is None or route.data is None:
            self._send(h, 404, {}, b"not found")
        else:
            self._serve_file(h, route, reply)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _serve_file(self, h: BaseHTTPRequestHandler, route: Route, reply: Reply) -> None:
        data = route.data or b""
        start = 0
        match = _RANGE_RE.match(h.headers.get("Range", ""))
        if match and route.range_support:
            start = int(match.group(1))
            if start >= len(data):
                self._send(h, 416, {"Content-Range": f"bytes */{len(data)}"}, b"")
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Type", route.content_type)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Accept-Ranges", "bytes" if route.range_support else "none")
        h.end_headers()
        payload = data[start:]
        if reply.cut_after is None:
            h.wfile.write(payload)
            return
        h.wfile.write(payload[: reply.cut_after])
        h.wfile.flush()
        if reply.reset:
            # SO_LINGER 0: close with a TCP reset, like a dropped connection.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            h.connection.shutdown(socket.SHUT_WR)
        h.connection.close()
        h.close_connection = True


def split_bytes(data: bytes, n: int) -> list[bytes]:
    """Cut ``data`` into ``n`` consecutive parts (split archive volumes); the last may be shorter."""
    step = -(-len(data) // n)
    return [data[i * step : (i + 1) * step] for i in range(n)]


def seven_zip(members: dict[str, bytes]) -> bytes:
    """A 7z archive holding ``members`` (name -> bytes), with a plain (unencoded) header."""
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as archive:
        archive.encoded_header_mode = False  # plain header, so a test can rewrite a name
        for name, data in members.items():
            archive.writestr(data, name)
    return buf.getvalue()


def serve_volumes(server: LocalServer, parts: list[str], volumes: list[bytes], prefix: str = "/aerial/") -> None:
    """Serve the 7z volumes of a fake Inria archive as ``prefix + part name``, like files.inria.fr."""
    for name, data in zip(parts, volumes, strict=True):
        server.add(prefix + name, Route(data=data))


@contextlib.contextmanager
def mlflow_server(backend_uri: str, timeout: float = 120.0, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 over ``backend_uri`` (``extra``: more options); yields its base URL.

    Started as a subprocess (one worker), polled on ``/health`` until it answers, stopped on exit.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"mlflow server did not start: {log.read()[-2000:].decode(errors='replace')}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
