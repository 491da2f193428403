"""Open Inference Protocol (KServe v2) REST server for the active model.

A lean HTTP/1.1 server on ``socketserver`` (one thread per keep-alive
connection, on TCP ``HOST:PORT`` or a Unix socket ``unix:/path``): the thread
that reads a request runs the model and writes the answer, so a request
crosses no queue and no thread hand-off. Heads are parsed here, not by
``http.server`` (whose ``email``-based header parser cost more than the digits
model itself). Tensors travel as JSON or with the binary tensor data extension
(agent/oip.py). Every bad request gets a 4xx JSON ``{"error": "..."}`` and the
server keeps serving.

    python -m edgefleet.agent.serve MODEL.onnx [--name NAME] [--http HOST:PORT]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from prometheus_client.registry import CollectorRegistry

from edgefleet.common.defaults import DEFAULT_SERVE_ADDRESS
from edgefleet.common.errors import EdgefleetError
from edgefleet.common.protocol import ModelRef

from . import metrics
from .batching import BatchPolicy
from .config import AgentConfig
from .errors import AgentError, ModelError, RequestError
from .oip import (
    OnInference,
    decode_request,
    encode_response,
    model_metadata,
    notify,
    requested_outputs,
)
from .runtime import LoadedModel, ModelRuntime, NotServingError, RuntimeOptions
from .served import ServedModels, UnknownModel

if TYPE_CHECKING:
    from .grpc_serve import GrpcServer  # needs the grpc extra: imported when asked for

log = logging.getLogger(__name__)

SERVER_NAME = "edgefleet-agent"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
IDLE_TIMEOUT_S = 60.0  # an idle keep-alive connection is closed after this
_READ_BUFFER = 64 * 1024
_MAX_LINE = 65536      # request line or one header line, as http.server allows
_MAX_HEADERS = 100
_DRAIN_S = 1.0                # how long a closing connection's unread input is drained
_DRAIN_BYTES = 1024 * 1024    # and how much of it


@dataclass(frozen=True)
class ConnectionLimits:
    """What untrusted clients can hold: sockets, bodies in memory at once, and time to send one."""

    max_connections: int = 64       # more are answered 503 and closed at once
    max_bodies: int = 4             # requests with a body being read or answered at once
    body_wait_s: float = 10.0       # a request waits this long for a body slot, then gets 503
    body_timeout_s: float = 30.0    # a body not fully received after this gets 408


_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")

Answer = tuple[HTTPStatus, bytes, str]  # status, body, extra header lines (each ending in CRLF)

_STATUS_LINE = {status: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HTTPError(Exception):
    """An answer other than 200, raised inside a handler."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _BadHead(HTTPError):
    """The request line or headers cannot be read: answered, then the connection is closed."""


@dataclass
class _Head:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    keep_alive: bool
    http10: bool


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a gzip/deflate body without ever holding more than ``limit`` bytes."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise HTTPError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none",
        )
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestError(f"request body is not valid {encoding}: {e}") from None
    if len(data) > limit:
        raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"decompressed request exceeds the {limit}-byte limit")
    return data


def _parse_head(rfile: io.BufferedReader) -> _Head | None:
    """One request's line and headers from the buffered reader; None at a clean end of the connection."""
    line = rfile.readline(_MAX_LINE + 1)
    if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore an empty line before a request line
        line = rfile.readline(_MAX_LINE + 1)
    if not line:
        return None
    if len(line) > _MAX_LINE:
        raise _BadHead(HTTPStatus.REQUEST_URI_TOO_LONG, f"request line longer than {_MAX_LINE} bytes")
    parts = line.split()
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        shown = line[:80].decode("latin-1").rstrip("\r\n")
        raise _BadHead(HTTPStatus.BAD_REQUEST, f"bad request line {shown!r}; this server speaks HTTP/1.1")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        raw = rfile.readline(_MAX_LINE + 1)
        if len(raw) > _MAX_LINE:
            raise _BadHead(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"a header line is longer than {_MAX_LINE}")
        if raw in (b"\r\n", b"\n", b""):
            break
        name, colon, value = raw.partition(b":")
        # whitespace before the colon is how requests are smuggled past proxies: refused (RFC 9112 5.1)
        if not colon or not name or name != name.strip():
            raise _BadHead(HTTPStatus.BAD_REQUEST, f"malformed header line {raw[:80].decode('latin-1')!r}")
        key = name.decode("latin-1").lower()
        if key in headers and key in ("content-length", "transfer-encoding"):
            raise _BadHead(HTTPStatus.BAD_REQUEST, f"{key} is given twice")
        headers[key] = value.strip().decode("latin-1")
    else:
        raise _BadHead(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {_MAX_HEADERS} headers")
    connection = headers.get("connection", "").lower()
    http10 = parts[2] == b"HTTP/1.0"
    keep_alive = "keep-alive" in connection if http10 else "close" not in connection
    return _Head(parts[0].decode("latin-1"), parts[1].decode("latin-1").split("?", 1)[0], headers, keep_alive, http10)


class _Handler(socketserver.BaseRequestHandler):
    """One connection: requests in turn until the client closes, idles out, or a body is left unread."""

    server: _TCPServer | _UnixServer
    request: socket.socket

    def setup(self) -> None:
        sock = self.request
        if sock.family != socket.AF_UNIX:
            # head and body can go out as two writes: Nagle + delayed ACK would add 40 ms to each
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IDLE_TIMEOUT_S)
        self.rfile = cast(io.BufferedReader, sock.makefile("rb", _READ_BUFFER))
        self.answered: tuple[dict, dict, LoadedModel] | None = None

    def finish(self) -> None:
        self.rfile.close()

    def handle(self) -> None:
        self.unread = False
        try:
            while self._one():
                pass
            if self.unread:
                self._drain()
        except OSError:  # the client went away, idled out (TimeoutError), or stop() shut the socket
            pass

    def _drain(self) -> None:
        """Close without a reset: input left unread at close() makes the kernel send RST, which can
        destroy the answer before the client reads it. Read (and drop) a bounded amount first."""
        self.request.shutdown(socket.SHUT_WR)
        self.request.settimeout(_DRAIN_S)
        for _ in range(_DRAIN_BYTES // _READ_BUFFER):
            if not self.rfile.read1(_READ_BUFFER):
                return

    def _one(self) -> bool:
        """Answer one request; whether the connection stays open for another."""
        try:
            head = _parse_head(self.rfile)
        except _BadHead as e:
            self._send(e.status, _error(str(e)), "", keep_alive=False)
            self.unread = True
            return False
        if head is None:
            return False
        # a body we do not read would be parsed as the next request: unless read, close after answering
        self.unread = head.headers.get("content-length", "0") != "0" or "transfer-encoding" in head.headers
        try:
            if head.method == "POST":
                status, body, extra = self._post(head)
            elif head.method == "GET":
                status, body, extra = self._get(head.path)
            else:
                raise HTTPError(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {head.method!r}; use GET or POST")
        except HTTPError as e:
            status, body, extra = e.status, _error(str(e)), ""
        except RequestError as e:
            status, body, extra = HTTPStatus.BAD_REQUEST, _error(str(e)), ""
        except NotServingError as e:
            status, body, extra = HTTPStatus.SERVICE_UNAVAILABLE, _error(str(e)), ""
        except ModelError as e:
            status, body, extra = HTTPStatus.INTERNAL_SERVER_ERROR, _error(str(e)), ""
        except OSError:
            raise  # the connection itself failed: nothing to answer on
        except Exception as e:
            log.exception("inference server: unexpected error on %s", head.path)
            status, body, extra = HTTPStatus.INTERNAL_SERVER_ERROR, _error(f"internal error: {e}"), ""
        keep_alive = head.keep_alive and not self.unread
        self._send(status, body, extra, keep_alive, head.http10)
        if self.answered is not None:  # sampling runs after the answer is out, off the request's latency
            self.server.notify(*self.answered)
            self.answered = None
        return keep_alive

    def _send(self, status: HTTPStatus, body: bytes, extra: str, keep_alive: bool, http10: bool = False) -> None:
        # HTTP/1.1 keeps a connection open unless told; HTTP/1.0 only when told
        connection = "Connection: close\r\n" if not keep_alive else "Connection: keep-alive\r\n" if http10 else ""
        head = b"%sContent-Length: %d\r\n%s%s\r\n" % (
            _STATUS_LINE[status], len(body), (extra or "Content-Type: application/json\r\n").encode(),
            connection.encode())
        if len(body) <= _READ_BUFFER:
            self.request.sendall(head + body)  # one write: one packet for a small answer
        else:
            self.request.sendall(head)
            self.request.sendall(body)

    def _get(self, path: str) -> Answer:
        if path == "/v2/health/live":
            return HTTPStatus.OK, b'{"live":true}', ""
        if path == "/v2/health/ready":
            ready = self.server.models.ready
            return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), _json({"ready": ready}), ""
        if path == "/v2":
            return HTTPStatus.OK, _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}), ""
        if path == "/metrics":
            return HTTPStatus.OK, metrics.render(self.server.metrics), f"Content-Type: {metrics.CONTENT_TYPE}\r\n"
        match = _MODEL_PATH.match(path)
        if match and match["action"] != "/infer":
            loaded = self._model(match["name"], match["version"])
            if match["action"] == "/ready":
                return HTTPStatus.OK, _json({"name": loaded.name, "ready": True}), ""
            return HTTPStatus.OK, _json(model_metadata(loaded)), ""
        if match:
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST")
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint {path}")

    def _post(self, head: _Head) -> Answer:
        match = _MODEL_PATH.match(head.path)
        if not match or match["action"] != "/infer":
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint {head.path} (POST /v2/models/NAME/infer)")
        self._model(match["name"], match["version"])  # 404 before reading a body meant for another model
        runtime = self.server.models.runtime(match["name"])
        length = self._body_length(head.headers)
        server = self.server
        limits = server.limits
        if not server.bodies.acquire(timeout=limits.body_wait_s):
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"{limits.max_bodies} requests are being answered; retry later")
        try:
            body = self._read_body(length, head.headers)
            header_length = head.headers.get("inference-header-content-length")
            try:
                json_length = int(header_length) if header_length is not None else None
            except ValueError:
                raise RequestError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
            request, inputs = decode_request(body, json_length, server.max_request_bytes)
            outputs, loaded = runtime.infer(inputs)
        finally:
            server.bodies.release()
        answer, binary_length = encode_response(request, loaded, outputs, requested_outputs(request, loaded))
        self.answered = (inputs, outputs, loaded)
        if binary_length is None:
            return HTTPStatus.OK, answer, ""
        return HTTPStatus.OK, answer, (f"Content-Type: application/octet-stream\r\n"
                                       f"Inference-Header-Content-Length: {binary_length}\r\n")

    def _model(self, name: str, version: str | None) -> LoadedModel:
        try:
            return self.server.models.find(name, version)
        except UnknownModel as e:
            raise HTTPError(HTTPStatus.NOT_FOUND, str(e)) from None

    def _body_length(self, headers: dict[str, str]) -> int:
        """The declared body length, refused before anything is read when it is missing or too large."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "chunked requests are not accepted; send Content-Length")
        raw = headers.get("content-length", "")
        length = int(raw) if raw.isdigit() else -1  # isdigit: no sign, no spaces, no "1_000"
        if length < 0:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header with the request body")
        limit = self.server.max_request_bytes
        if length > limit:
            raise HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body is {length} bytes; the limit is {limit}"
            )
        return length

    def _read_body(self, length: int, headers: dict[str, str]) -> bytes:
        """Read the body as it arrives (never allocating what is only declared), within the body deadline."""
        if headers.get("expect", "").lower() == "100-continue":
            self.request.sendall(_CONTINUE)
        timeout = self.server.limits.body_timeout_s
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        received = 0
        sock = self.request
        try:
            while received < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = self.rfile.read1(length - received)
                if not chunk:
                    raise RequestError(f"request body ended after {received} of {length} bytes")
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            raise HTTPError(HTTPStatus.REQUEST_TIMEOUT,
                            f"request body not received within {timeout:g}s ({received} of {length} bytes)") from None
        finally:
            sock.settimeout(IDLE_TIMEOUT_S)
        self.unread = received < length
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        return data if encoding in ("", "identity") else _inflate(data, encoding, self.server.max_request_bytes)
def _refuse_connection(sock: socket.socket, limit: int) -> None:
    """A 503 written without ever blocking the accepting thread; dropped if the client's buffer is full."""
    body = _error(f"this server already has {limit} connections open; retry later")
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)
        sock.send(head + body)
    except OSError:
        pass


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error(message: str) -> bytes:
    return _json({"error": message})


class _ServerMixin:
    """What the handler needs from its server, for both socket families."""

    models: ServedModels
    max_request_bytes: int
    on_inference: OnInference | None
    limits: ConnectionLimits
    metrics: CollectorRegistry

    def setup_server(
        self, models: ServedModels, max_request_bytes: int, on_inference: OnInference | None, limits: ConnectionLimits,
        registry: CollectorRegistry,
    ) -> None:
        self.models = models
        self.metrics = registry
        self.max_request_bytes = max_request_bytes
        self.on_inference = on_inference
        self.limits = limits
        self.bodies = threading.BoundedSemaphore(limits.max_bodies)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def notify(self, inputs: dict, outputs: dict, loaded: LoadedModel) -> None:
        notify(self.on_inference, inputs, outputs, loaded)

    def process_request(self, request: Any, client_address: Any) -> None:  # on the accepting thread
        with self.connections_lock:
            full = len(self.connections) >= self.limits.max_connections
            if not full:
                self.connections.add(request)
        if full:
            _refuse_connection(request, self.limits.max_connections)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        super().process_request(request, client_address)  # type: ignore[misc]

    def process_request_thread(self, request: Any, client_address: Any) -> None:  # request: a stream socket
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def close_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections so stop() leaves none behind."""
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _TCPServer(_ServerMixin, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # clients connecting at once wait in the backlog, not in SYN retries


class _UnixServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 64


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class InferenceServer:
    """The OIP server on ``address`` (``HOST:PORT`` or ``unix:/path``) for ``models`` (each by its
    name; or one runtime), and ``GET /metrics``: ``registry``, else the models' inference metrics."""

    def __init__(
        self,
        models: ServedModels | ModelRuntime,
        address: str = DEFAULT_SERVE_ADDRESS,
        max_request_bytes: int = AgentConfig.max_request_bytes,
        on_inference: OnInference | None = None,
        limits: ConnectionLimits = ConnectionLimits(),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.models = ServedModels.of(models)
        self.address = address
        self.max_request_bytes = max_request_bytes
        self.on_inference = on_inference
        self.limits = limits
        self.registry = registry or metrics.registry(metrics.InferenceCollector(self.models))
        self._server: _TCPServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` for TCP; for a Unix socket, the ``unix:`` address itself."""
        server = self._server
        if server is None or isinstance(server, _UnixServer):
            return self.address
        host, port = _tcp_address(server)
        return f"http://{host}:{port}"

    def start(self) -> None:
        try:
            if self.address.startswith("unix:"):
                path = Path(self.address[len("unix:"):])
                if path.is_socket():
                    path.unlink()  # a stale socket from a crashed run
                server: _TCPServer | _UnixServer = _UnixServer(str(path), _Handler)
            else:
                host, _, port = self.address.rpartition(":")
                host = host.strip("[]") or "127.0.0.1"
                server = (_TCP6Server if ":" in host else _TCPServer)((host, int(port)), _Handler)
        except (OSError, ValueError) as e:
            raise AgentError(
                f"cannot serve on {self.address}: {e}; use HOST:PORT or unix:/path with a free address"
            ) from e
        server.setup_server(self.models, self.max_request_bytes, self.on_inference, self.limits, self.registry)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="oip-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        while stopper.is_alive():  # a connection wakes serve_forever's select() instead of its 0.5 s poll
            _poke(server)
            stopper.join(0.01)
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
        if isinstance(server, _UnixServer):
            Path(_unix_path(server)).unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tcp_address(server: _TCPServer) -> tuple[str, int]:
    """(host, port) of a bound server: getsockname() gives a str host (typeshed also allows bytes)."""
    host, port = server.server_address[:2]
    return cast(str, host), port


def _unix_path(server: _UnixServer) -> str:
    return cast(str, server.server_address)  # the str path it was bound to


def _poke(server: _TCPServer | _UnixServer) -> None:
    address: str | tuple[str, int]
    if isinstance(server, _UnixServer):
        family, address = socket.AF_UNIX, _unix_path(server)
    else:
        address = _tcp_address(server)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            s.connect(address)
    except OSError:
        pass


# --- `fleet-agent serve` -----------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="fleet-agent serve", description="Serve local ONNX models over the Open Inference Protocol."
    )
    parser.add_argument("model", type=Path, nargs="+", help="ONNX model file(s), each served under its own name")
    parser.add_argument("--name", help="model name in URLs, for one model (default: the file name without .onnx)")
    parser.add_argument("--version", default="1", help="model version reported (default: 1)")
    parser.add_argument("--http", default=DEFAULT_SERVE_ADDRESS, help="HOST:PORT or unix:/path (default: %(default)s)")
    parser.add_argument("--grpc", metavar="ADDRESS", default="",
                        help="also serve OIP over gRPC on HOST:PORT or unix:/path (needs the agent's grpc extra)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    parser.add_argument("--max-request-bytes", type=int, default=AgentConfig.max_request_bytes)
    parser.add_argument("--max-batch-size", type=int, default=0,
                        help="batch concurrent requests up to this many rows (default: 0, off)")
    parser.add_argument("--max-queue-delay-us", type=int, default=AgentConfig.max_queue_delay_us,
                        help="how long a batch's first request waits for others (default: %(default)s)")
    return parser


def limits_for(max_batch_size: int) -> ConnectionLimits:
    """The default limits, with room for a whole batch's bodies in memory at once."""
    return ConnectionLimits(max_bodies=max(ConnectionLimits.max_bodies, max_batch_size))


def start_grpc(models: ServedModels | ModelRuntime, address: str, max_request_bytes: int, limits: ConnectionLimits,
               on_inference: OnInference | None = None) -> GrpcServer:
    """The gRPC front end on ``address``, started; AgentError when grpcio is not installed."""
    try:
        from .grpc_serve import GrpcServer
    except ImportError as e:
        raise AgentError(f"gRPC serving needs the agent's grpc extra ({e.name} is missing): "
                         "pip install 'edgefleet[agent,grpc]'") from e
    server = GrpcServer(models, address, max_request_bytes, limits.max_bodies, on_inference)
    server.start()
    return server


def serve_command(args: argparse.Namespace) -> int:
    try:
        batching = BatchPolicy(args.max_batch_size, args.max_queue_delay_us) if args.max_batch_size > 1 else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = [args.name] if args.name and len(args.model) == 1 else [path.stem for path in args.model]
    if (args.name and len(args.model) > 1) or len(set(names)) < len(names):
        print("error: each model needs its own name: --name takes one model; rename files that share a name",
              file=sys.stderr)
        return 1
    models = ServedModels()
    try:
        for name, path in zip(names, args.model, strict=True):
            runtime = ModelRuntime(RuntimeOptions(intra_op_threads=args.threads, batching=batching))
            models.add(name, runtime)
            runtime.swap(runtime.load(path, ModelRef(model=name, version=args.version, variant="local")))
        limits = limits_for(args.max_batch_size)
        # gRPC first: once REST answers (what clients and benchmarks wait for), gRPC does too
        grpc_server = start_grpc(models, args.grpc, args.max_request_bytes, limits) if args.grpc else None
        server = InferenceServer(models, args.http, args.max_request_bytes, limits=limits)
        try:
            server.start()
        except EdgefleetError:
            if grpc_server is not None:
                grpc_server.stop()
            raise
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        models.close()
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {', '.join(names)} on {server.url}" + (f" and gRPC {args.grpc}" if grpc_server else ""),
          flush=True)
    stop.wait()
    if grpc_server is not None:
        grpc_server.stop()
    server.stop()
    models.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
