"""A threaded HTTP server over a directory or an artifact store, with HTTP Range
support and fault hooks, for tests of downloads and of the TUF client.

    with serve(tmp_path / "store") as server:
        server.faults = Faults(match=".onnx", cut_after=1000)
        ... fetch f"{server.url}/repository/targets/..." ...
        assert server.requests[-1].range == "bytes=1000-"
"""
from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from edgefleet.controller.store.local import read_range

STALL_LIMIT_S = 60.0  # a stalled response is released after this even if nobody stops the server
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class Source(Protocol):
    """What the server reads: the part of ``ArtifactStore`` it needs."""

    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...


class DirectorySource:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path | None:
        path = (self.root / key).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key) is not None

    def size(self, key: str) -> int:
        path = self._path(key)
        assert path is not None
        return path.stat().st_size

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._path(key)
        assert path is not None
        with open(path, "rb") as f:
            yield from read_range(f, start, end)


@dataclass
class Faults:
    """Misbehaviour applied to requests whose path contains ``match`` (every request when empty)."""

    match: str = ""
    status: int | None = None       # answer this status with an empty body
    cut_after: int | None = None    # send this many body bytes, then drop the connection
    stall_after: int | None = None  # send this many body bytes, then send nothing more
    extra: bytes = b""              # bytes appended after the real body (counted in Content-Length)
    ignore_range: bool = False      # answer 200 with the whole file even to Range requests

    def applies(self, path: str) -> bool:
        return self.match in path


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None


@dataclass
class RepoServer:
    """A running server; ``faults`` may be replaced at any time."""

    source: Source
    faults: Faults = field(default_factory=Faults)
    requests: list[Request] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def paths(self, contains: str = "") -> list[str]:
        """Paths requested so far (optionally only those containing ``contains``)."""
        return [r.path for r in self.requests if contains in r.path]

    def start(self) -> RepoServer:
        server = self

        class Handler(_Handler):
            repo = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="repo-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RepoServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    repo: RepoServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self) -> None:  # http.server naming
        key = unquote(urlsplit(self.path).path).lstrip("/")
        requested = self.headers.get("Range")
        self.repo.requests.append(Request(key, requested))
        faults = self.repo.faults if self.repo.faults.applies(key) else Faults()
        if faults.status is not None:
            return self._empty(faults.status)
        source = self.repo.source
        if not key or not source.exists(key):
            return self._empty(404)
        size = source.size(key)
        start, end = 0, size - 1
        match = _RANGE.fullmatch(requested or "")
        partial = match is not None and not faults.ignore_range
        if partial:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size:
                return self._empty(416, {"Content-Range": f"bytes */{size}"})
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1 + len(faults.extra)))
        self.end_headers()
        self._body(source.open_range(key, start, end), faults)

    def _body(self, blocks: Iterator[bytes], faults: Faults) -> None:
        limit = min((n for n in (faults.cut_after, faults.stall_after) if n is not None), default=None)
        sent = 0
        for block in blocks:
            if limit is not None:
                block = block[: max(0, limit - sent)]
            self.wfile.write(block)
            sent += len(block)
            if limit is not None and sent >= limit:
                break
        else:
            self.wfile.write(faults.extra)
            return
        self.wfile.flush()
        if faults.stall_after is not None and sent >= faults.stall_after:
            self.repo._stopping.wait(STALL_LIMIT_S)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def serve(root: Path | Source) -> RepoServer:
    """Serve a directory (or an ``ArtifactStore``) at ``RepoServer.url``; call ``stop()`` after."""
    source = DirectorySource(root) if isinstance(root, (str, Path)) else root
    return RepoServer(source).start()
