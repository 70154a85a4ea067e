"""docs/team.md on 127.0.0.1: a DVC HTTP remote a teammate pulls from, and a team MLflow server.

- A tiny DVC project (one stage writing a file and a folder) is reproduced and pushed to an
  HTTP remote (``method PUT``) served by :class:`FileServer`; a git clone of it pulls, its
  ``dvc status`` is clean (nothing would rerun) and the pulled bytes equal the pushed ones.
- ``mlflow server`` with a SQLite database and an ``--artifacts-destination`` folder: a stage
  run of :mod:`cadalign.tracking` logs a metric and an artifact through
  ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``; both are read back through the server and
  the artifact lies in the destination folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from servers import LocalServer, mlflow_server

TIMEOUT_S = 150  # every subprocess (the MLflow server: 4x to start); a loaded 2-core machine is slow, never this slow


class FileServer(LocalServer):
    """A folder served over HTTP on 127.0.0.1 (OS-chosen port): GET/HEAD read files, PUT/POST
    write them (plain or chunked bodies, as aiohttp streams them), parent folders created."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.methods: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
                return

            def _file(self) -> Path | None:
                rel = urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/")
                path = (server.root / rel).resolve()
                return path if path.is_relative_to(server.root.resolve()) else None

            def _reply(self, status: int, body: bytes = b"", send_body: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _read(self, send_body: bool) -> None:
                server.methods.append(self.command)
                path = self._file()
                if path is None or not path.is_file():
                    self._reply(404, b"not found", send_body)
                else:
                    self._reply(200, path.read_bytes(), send_body)

            def do_GET(self) -> None:
                self._read(True)

            def do_HEAD(self) -> None:
                self._read(False)

            def do_PUT(self) -> None:
                server.methods.append(self.command)
                body = self._body()
                path = self._file()
                if path is None:
                    self._reply(403, b"outside the served folder")
                    return
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
                self._reply(201)

            do_POST = do_PUT

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", "0")))
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)

        super().__init__()
        self._httpd.RequestHandlerClass = Handler  # LocalServer's threaded server, this handler


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    (tmp_path / "remote").mkdir()
    with FileServer(tmp_path / "remote") as server:
        yield server


def sh(*argv: str, cwd: Path) -> str:
    env = {**os.environ, **{f"GIT_{who}_{what}": "t" for who in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL")}}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} in {cwd}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


STAGE = """\
import pathlib, random
rng = random.Random(7)
pathlib.Path("data/tiles").mkdir(parents=True, exist_ok=True)
pathlib.Path("data/model.bin").write_bytes(bytes(rng.randrange(256) for _ in range(50000)))
for k in range(3):
    pathlib.Path(f"data/tiles/{k}.bin").write_bytes(bytes(rng.randrange(256) for _ in range(1000 + k)))
"""


def _outputs(proj: Path) -> dict[str, bytes]:
    return {p.relative_to(proj).as_posix(): p.read_bytes() for p in sorted((proj / "data").rglob("*.bin"))}


@pytest.mark.slow
def test_a_teammate_pulls_what_was_pushed_to_an_http_remote(tmp_path: Path, file_server: FileServer) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "make.py").write_text(STAGE)
    sh("git", "init", "-q", cwd=proj)
    sh("dvc", "init", "-q", cwd=proj)
    sh("dvc", "stage", "add", "-q", "-n", "make", "-d", "make.py", "-o", "data/model.bin", "-o", "data/tiles",
       "python3 make.py", cwd=proj)
    # the commands of docs/team.md, the remote an HTTP server that takes PUT
    sh("dvc", "remote", "add", "-d", "team", file_server.url("/cadalign"), cwd=proj)
    sh("dvc", "remote", "modify", "team", "method", "PUT", cwd=proj)
    sh("dvc", "repro", cwd=proj)
    sh("git", "add", "-A", cwd=proj)
    sh("git", "commit", "-qm", "study", cwd=proj)
    sh("dvc", "push", cwd=proj)
    pushed = _outputs(proj)
    assert len(pushed) == 4 and "PUT" in file_server.methods
    assert len([p for p in (file_server.root / "cadalign").rglob("*") if p.is_file()]) == 5  # 4 files + .dir

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(proj), str(clone), cwd=tmp_path)
    assert _outputs(clone) == {}
    sh("dvc", "pull", cwd=clone)
    assert _outputs(clone) == pushed
    status = sh("dvc", "status", cwd=clone)
    assert "up to date" in status, status
    assert "Stage 'make' didn't change" in sh("dvc", "repro", cwd=clone)  # nothing reruns
    assert "in sync" in sh("dvc", "status", "--cloud", cwd=clone)


@pytest.mark.slow
def test_a_team_mlflow_server_keeps_metrics_and_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from cadalign.tracking import stage_run

    store = tmp_path / "artifacts"
    artifact = tmp_path / "model.bin"
    artifact.write_bytes(bytes(range(256)) * 40)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_server(db, timeout=TIMEOUT_S * 4, extra=("--artifacts-destination", str(store))) as base:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        with stage_run("train@round1", {"train": {"steps": 3}}, study="team") as run:
            run.log_metrics({"loss": 0.25}, step=2)
            run.log_artifact(artifact, "checkpoints")
        run_id = run.run_id

        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as reply:
            data = json.loads(reply.read())["run"]["data"]
        assert {"key": "train.steps", "value": "3"} in data["params"]
        assert [(m["key"], m["value"], m["step"]) for m in data["metrics"]] == [("loss", 0.25, 2)]
        got = MlflowClient(tracking_uri=base).download_artifacts(run_id, "checkpoints/model.bin", str(tmp_path / "got"))
        assert Path(got).read_bytes() == artifact.read_bytes()
    stored = list(store.rglob("model.bin"))  # the server wrote it to --artifacts-destination
    assert len(stored) == 1 and run_id in stored[0].parts and stored[0].read_bytes() == artifact.read_bytes()
