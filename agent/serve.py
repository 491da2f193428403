"""Open Inference Protocol (KServe v2) REST server for the active model.

Stdlib ``http.server`` with one thread per connection (HTTP/1.1 keep-alive),
on TCP ``HOST:PORT`` or a Unix socket ``unix:/path``. Tensors travel as JSON or
with the binary tensor data extension. Every bad request gets a 4xx JSON
``{"error": "..."}`` and the server keeps serving.

    python -m edgefleet.agent.serve MODEL.onnx [--name NAME] [--http HOST:PORT]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self, cast

import numpy as np

from edgefleet.common import jsonlimit
from edgefleet.common.defaults import DEFAULT_SERVE_ADDRESS
from edgefleet.common.errors import EdgefleetError
from edgefleet.common.protocol import ModelRef

from .config import AgentConfig
from .errors import AgentError, ModelError, RequestError
from .runtime import (
    DATATYPES,
    LoadedModel,
    ModelRuntime,
    NotServingError,
    RuntimeOptions,
)

log = logging.getLogger(__name__)

SERVER_NAME = "edgefleet-agent"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
IDLE_TIMEOUT_S = 60.0  # an idle keep-alive connection is closed after this
MAX_JSON_DEPTH = 64    # an input's nested "data" lists are as deep as its rank
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    """What untrusted clients can hold: sockets, bodies in memory at once, and time to send one."""

    max_connections: int = 64       # more are answered 503 and closed at once
    max_bodies: int = 4             # requests with a body being read or answered at once
    body_wait_s: float = 10.0       # a request waits this long for a body slot, then gets 503
    body_timeout_s: float = 30.0    # a body not fully received after this gets 408

_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")

OnInference = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], LoadedModel], None]


class HTTPError(Exception):
    """An answer other than 200, raised inside a handler."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- request and response bodies (no I/O) ------------------------------------


def decode_request(
    body: bytes, header_length: int | None, max_bytes: int | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Split an infer body into its JSON header and input arrays (binary extension aware).

    ``max_bytes`` bounds what any input's shape may declare (default: the body's size).
    """
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise RequestError(f"Inference-Header-Content-Length {header_length} exceeds the body ({len(body)} bytes)")
    try:
        request = jsonlimit.loads(body[:header_length], MAX_JSON_DEPTH)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object")
    tensors = request.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise RequestError('request needs a non-empty "inputs" list')
    binary = memoryview(body)[header_length:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for tensor in tensors:
        name, dtype, shape = _tensor_header(tensor, len(body) if max_bytes is None else max_bytes)
        if name in inputs:
            raise RequestError(f"input {name!r} is given twice")
        size = _binary_size(tensor)
        if size is not None:
            if offset + size > len(binary):
                raise RequestError(
                    f"input {name!r} declares {size} binary bytes; the body has {len(binary) - offset} left"
                )
            inputs[name] = _from_bytes(name, binary[offset:offset + size], dtype, shape)
            offset += size
        elif "data" in tensor:
            inputs[name] = _from_json(name, tensor["data"], dtype, shape)
        else:
            raise RequestError(f'input {name!r} has neither "data" nor a "binary_data_size" parameter')
    if offset != len(binary):
        raise RequestError(f"the body carries {len(binary) - offset} binary bytes that no input claims")
    return request, inputs


def _tensor_header(tensor: Any, max_bytes: int) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise RequestError('every input must be an object with a "name"')
    name = tensor["name"]
    datatype = tensor.get("datatype")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise RequestError(f"input {name!r} has datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f'input {name!r} needs "shape" as a list of non-negative integers')
    if len(shape) > MAX_JSON_DEPTH:
        raise RequestError(f"input {name!r} has {len(shape)} dimensions; at most {MAX_JSON_DEPTH} are accepted")
    # Python ints: numpy's int64 product would wrap (or raise) on a hostile shape
    if any(d > max_bytes for d in shape) or math.prod(shape) * dtype.itemsize > max_bytes:
        raise RequestError(f"input {name!r} declares shape {shape}; a request holds at most {max_bytes} bytes")
    return name, dtype, tuple(shape)


def _binary_size(tensor: dict) -> int | None:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(f'input {tensor["name"]!r} has "parameters" that are not an object')
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(f'input {tensor["name"]!r} has an invalid binary_data_size {size!r}')
    return size


def _from_bytes(name: str, data: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise RequestError(f"input {name!r} has {len(data)} binary bytes; shape {list(shape)} needs {expected}")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _from_json(name: str, data: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise RequestError(f"input {name!r} data does not convert to {dtype}: {e}") from None
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise RequestError(f"input {name!r} has {array.size} values; shape {list(shape)} needs {int(np.prod(shape))}")
    return array.reshape(shape)


def requested_outputs(request: dict, loaded: LoadedModel) -> list[tuple[str, bool]]:
    """(output name, as binary) in answer order: the requested ones, else all."""
    parameters = request.get("parameters") or {}
    binary_default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
    wanted = request.get("outputs")
    if wanted is None:
        return [(spec.name, binary_default) for spec in loaded.outputs]
    if not isinstance(wanted, list):
        raise RequestError('"outputs" must be a list')
    known = {spec.name for spec in loaded.outputs}
    chosen = []
    for output in wanted:
        if not isinstance(output, dict) or output.get("name") not in known:
            name = output.get("name") if isinstance(output, dict) else output
            raise RequestError(f"unknown output {name!r}; the model gives {', '.join(sorted(known))}")
        params = output.get("parameters") or {}
        chosen.append((output["name"], bool(params.get("binary_data", binary_default))))
    return chosen


def encode_response(
    request: dict, loaded: LoadedModel, outputs: dict[str, np.ndarray], wanted: list[tuple[str, bool]]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    specs = {spec.name: spec for spec in loaded.outputs}
    tensors, chunks = [], []
    for name, binary in wanted:
        value = np.ascontiguousarray(outputs[name])
        tensor: dict[str, Any] = {"name": name, "datatype": specs[name].datatype, "shape": list(value.shape)}
        if binary:
            raw = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = value.reshape(-1).tolist()
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": loaded.name, "model_version": loaded.version, "outputs": tensors}
    if "id" in request:
        answer["id"] = request["id"]
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def model_metadata(loaded: LoadedModel) -> dict:
    return {
        "name": loaded.name,
        "versions": [loaded.version],
        "platform": "onnxruntime_onnx",
        "inputs": [spec.to_dict() for spec in loaded.inputs],
        "outputs": [spec.to_dict() for spec in loaded.outputs],
    }


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


# --- HTTP --------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"{SERVER_NAME}/{SERVER_VERSION}"
    timeout = IDLE_TIMEOUT_S
    # http.server's own refusals (malformed request line, oversized headers, unknown method) as JSON too
    error_content_type = "application/json"
    error_message_format = '{"error": "%(code)d %(message)s"}'
    _answered: tuple[dict, dict, LoadedModel] | None = None
    server: _TCPServer | _UnixServer

    def setup(self) -> None:
        # Headers and body go out as two writes: on TCP, Nagle + delayed ACK would add 40 ms to each answer.
        # typeshed calls it a ClassVar, but StreamRequestHandler.setup() reads it from the instance
        self.disable_nagle_algorithm = self.request.family != socket.AF_UNIX  # type: ignore[misc]
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s " + format, self.path if hasattr(self, "path") else "", *args)

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, route: Callable[[str], tuple[HTTPStatus, bytes, dict[str, str]]]) -> None:
        try:
            status, body, headers = route(self.path.split("?", 1)[0])
        except HTTPError as e:
            status, body, headers = e.status, _error(str(e)), {}
        except RequestError as e:
            status, body, headers = HTTPStatus.BAD_REQUEST, _error(str(e)), {}
        except NotServingError as e:
            status, body, headers = HTTPStatus.SERVICE_UNAVAILABLE, _error(str(e)), {}
        except ModelError as e:
            status, body, headers = HTTPStatus.INTERNAL_SERVER_ERROR, _error(str(e)), {}
        except Exception as e:  # one bad request must never stop the server
            log.exception("inference server: unexpected error on %s", self.path)
            status, body, headers = HTTPStatus.INTERNAL_SERVER_ERROR, _error(f"internal error: {e}"), {}
        self._send(status, body, headers)
        if self._answered is not None:  # sampling runs after the answer is out, off the request's latency
            self.server.notify(*self._answered)
            self._answered = None

    def _send(self, status: HTTPStatus, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _get(self, path: str) -> tuple[HTTPStatus, bytes, dict[str, str]]:
        runtime = self.server.runtime
        if path == "/v2/health/live":
            return HTTPStatus.OK, _json({"live": True}), {}
        if path == "/v2/health/ready":
            ready = runtime.active is not None
            return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), _json({"ready": ready}), {}
        if path == "/v2":
            return HTTPStatus.OK, _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}), {}
        match = _MODEL_PATH.match(path)
        if match and match["action"] != "/infer":
            loaded = self._model(match["name"], match["version"])
            if match["action"] == "/ready":
                return HTTPStatus.OK, _json({"name": loaded.name, "ready": True}), {}
            return HTTPStatus.OK, _json(model_metadata(loaded)), {}
        if match:
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST")
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint {path}")

    def _post(self, path: str) -> tuple[HTTPStatus, bytes, dict[str, str]]:
        match = _MODEL_PATH.match(path)
        if not match or match["action"] != "/infer":
            self._refuse_body()
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint {path} (POST /v2/models/NAME/infer)")
        try:
            self._model(match["name"], match["version"])  # 404 before reading a body meant for another model
        except HTTPError:
            self._refuse_body()
            raise
        length = self._body_length()
        limits, bodies = self.server.limits, self.server.bodies
        if not bodies.acquire(timeout=limits.body_wait_s):
            self.close_connection = True  # the body stays unread
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"{limits.max_bodies} requests are being answered; retry later")
        try:
            request, inputs, outputs, loaded = self._infer(length)
        finally:
            bodies.release()
        wanted = requested_outputs(request, loaded)
        body, json_length = encode_response(request, loaded, outputs, wanted)
        self._answered = (inputs, outputs, loaded)
        if json_length is None:
            return HTTPStatus.OK, body, {}
        return HTTPStatus.OK, body, {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(json_length),
        }

    def _model(self, name: str, version: str | None) -> LoadedModel:
        loaded = self.server.runtime.active
        if loaded is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"model {name!r} is not loaded (no model is active)")
        if name != loaded.name:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"unknown model {name!r}; this server serves {loaded.name!r}")
        if version is not None and version != loaded.version:
            raise HTTPError(
                HTTPStatus.NOT_FOUND, f"model {name!r} has no version {version!r}; serving {loaded.version!r}"
            )
        return loaded

    def _infer(self, length: int) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray], LoadedModel]:
        body = self._read_body(length)
        header_length = self.headers.get("Inference-Header-Content-Length")
        try:
            header = int(header_length) if header_length is not None else None
        except ValueError:
            raise RequestError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        request, inputs = decode_request(body, header, self.server.max_request_bytes)
        outputs, loaded = self.server.runtime.infer(inputs)
        return request, inputs, outputs, loaded

    def _body_length(self) -> int:
        """The declared body length, refused before anything is read when it is missing or too large."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "chunked requests are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header with the request body")
        limit = self.server.max_request_bytes
        if length > limit:
            self.close_connection = True  # the body stays unread: this connection cannot be reused
            raise HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body is {length} bytes; the limit is {limit}"
            )
        return length

    def _read_body(self, length: int) -> bytes:
        """Read the body as it arrives (never allocating what is only declared), within the body deadline."""
        timeout = self.server.limits.body_timeout_s
        deadline = time.monotonic() + timeout
        body = bytearray()
        try:
            while len(body) < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(_READ_CHUNK, length - len(body)))
                if not chunk:
                    self.close_connection = True
                    raise RequestError(f"request body ended after {len(body)} of {length} bytes")
                body += chunk
        except TimeoutError:
            self.close_connection = True
            raise HTTPError(HTTPStatus.REQUEST_TIMEOUT,
                            f"request body not received within {timeout:g}s ({len(body)} of {length} bytes)") from None
        finally:
            self.connection.settimeout(self.timeout)
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        data = bytes(body)
        return data if encoding in ("", "identity") else _inflate(data, encoding, self.server.max_request_bytes)

    def _refuse_body(self) -> None:
        if self.headers.get("Content-Length") not in (None, "0"):
            self.close_connection = True


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

    runtime: ModelRuntime
    max_request_bytes: int
    on_inference: OnInference | None
    limits: ConnectionLimits

    def setup_server(
        self, runtime: ModelRuntime, max_request_bytes: int, on_inference: OnInference | None, limits: ConnectionLimits
    ) -> None:
        self.runtime = runtime
        self.max_request_bytes = max_request_bytes
        self.on_inference = on_inference
        self.limits = limits
        self.bodies = threading.BoundedSemaphore(limits.max_bodies)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def notify(self, inputs: dict, outputs: dict, loaded: LoadedModel) -> None:
        if self.on_inference is None:
            return
        try:
            self.on_inference(inputs, outputs, loaded)
        except Exception:  # sampling must never fail a request
            log.exception("inference hook failed; the request was still answered")

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


class _TCPServer(_ServerMixin, ThreadingHTTPServer):
    daemon_threads = True


class _UnixServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:  # http.server expects (host, port)-like
        request, _ = super().get_request()
        return request, ("unix", 0)


class InferenceServer:
    """The OIP server on ``address`` (``HOST:PORT`` or ``unix:/path``) for ``runtime.active``."""

    def __init__(
        self,
        runtime: ModelRuntime,
        address: str = DEFAULT_SERVE_ADDRESS,
        max_request_bytes: int = AgentConfig.max_request_bytes,
        on_inference: OnInference | None = None,
        limits: ConnectionLimits = ConnectionLimits(),
    ) -> None:
        self.runtime = runtime
        self.address = address
        self.max_request_bytes = max_request_bytes
        self.on_inference = on_inference
        self.limits = limits
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
                server = _TCPServer((host.strip("[]") or "127.0.0.1", int(port)), _Handler)
        except (OSError, ValueError) as e:
            raise AgentError(
                f"cannot serve on {self.address}: {e}; use HOST:PORT or unix:/path with a free address"
            ) from e
        server.setup_server(self.runtime, self.max_request_bytes, self.on_inference, self.limits)
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
        prog="fleet-agent serve", description="Serve one local ONNX model over the Open Inference Protocol."
    )
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("--name", help="model name in URLs (default: the file name without .onnx)")
    parser.add_argument("--version", default="1", help="model version reported (default: 1)")
    parser.add_argument("--http", default=DEFAULT_SERVE_ADDRESS, help="HOST:PORT or unix:/path (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    parser.add_argument("--max-request-bytes", type=int, default=AgentConfig.max_request_bytes)
    return parser


def serve_command(args: argparse.Namespace) -> int:
    runtime = ModelRuntime(RuntimeOptions(intra_op_threads=args.threads))
    ref = ModelRef(model=args.name or args.model.stem, version=args.version, variant="local")
    try:
        runtime.swap(runtime.load(args.model, ref))
        server = InferenceServer(runtime, args.http, args.max_request_bytes)
        server.start()
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {ref.model} on {server.url}", flush=True)
    stop.wait()
    server.stop()
    runtime.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
