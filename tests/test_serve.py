"""The Open Inference Protocol server, over real TCP and Unix sockets, with a standard client."""
from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from edgefleet.agent.runtime import LoadedModel, ModelRuntime
from edgefleet.agent.serve import ConnectionLimits, InferenceServer
from edgefleet.common.protocol import ModelRef

X = np.random.default_rng(1).random((2, 64), dtype=np.float32)
LIMIT = 64 * 1024
BINARY_HEADER = json.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 512}}]}).encode()


@pytest.fixture
def runtime(digits):
    runtime = ModelRuntime()
    runtime.swap(runtime.load(digits.model, ModelRef(model="digits", version="3", variant="cpu-fp32")))
    yield runtime
    runtime.close()


class _SeenServer(InferenceServer):
    seen: list[tuple[dict, dict, LoadedModel]]


@pytest.fixture
def server(runtime):
    seen: list[tuple[dict, dict, LoadedModel]] = []
    with _SeenServer(runtime, "127.0.0.1:0", LIMIT, on_inference=lambda i, o, m: seen.append((i, o, m))) as srv:
        srv.seen = seen
        yield srv


def expected(runtime) -> np.ndarray:
    return runtime.active.run({"input": X})["probabilities"]


def json_infer_body(data=None, shape=(2, 64), datatype="FP32", **extra) -> bytes:
    tensor = {"name": "input", "shape": list(shape), "datatype": datatype,
              "data": X.reshape(-1).tolist() if data is None else data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def post(server, path, body: bytes, headers: dict | None = None) -> tuple[int, dict, http.client.HTTPResponse]:
    host, port = server.url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response.status, json.loads(raw) if raw.startswith(b"{") else {}, response


def assert_still_serving(server, runtime) -> None:
    client = triton.InferenceServerClient(server.url[len("http://"):])
    try:
        assert client.is_server_live()
        tensor = triton.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        assert np.allclose(client.infer("digits", [tensor]).as_numpy("probabilities"), expected(runtime), atol=1e-6)
    finally:
        client.close()


def test_standard_client_health_metadata_and_infer_json_and_binary(server, runtime):
    client = triton.InferenceServerClient(server.url[len("http://"):])
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("digits", "3")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata("digits")
        assert meta["versions"] == ["3"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        for binary in (False, True):
            tensor = triton.InferInput("input", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X, binary_data=binary)
            wanted = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
            result = client.infer("digits", [tensor], outputs=wanted, request_id="r1", model_version="3")
            assert np.allclose(result.as_numpy("probabilities"), expected(runtime), atol=1e-6)
            assert result.get_response()["id"] == "r1"
            assert ("parameters" in result.get_response()["outputs"][0]) is binary
        # no outputs named: the client asks for every output in binary
        result = client.infer("digits", [tensor])
        assert result.as_numpy("label").dtype == np.int64 and result.as_numpy("label").shape == (2,)
        # a gzip-compressed request body
        result = client.infer("digits", [tensor], request_compression_algorithm="gzip")
        assert np.allclose(result.as_numpy("probabilities"), expected(runtime), atol=1e-6)
    finally:
        client.close()
    wait_for(lambda: len(server.seen) == 4)  # the hook runs just after each answer is sent
    inputs, outputs, loaded = server.seen[0]
    assert np.array_equal(inputs["input"], X) and loaded.ref.version == "3" and "probabilities" in outputs


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_unknown_method_gets_json(server):
    response = httpx.request("PUT", f"{server.url}/v2/models/digits/infer")
    assert response.status_code == 501 and "PUT" in response.json()["error"]


def test_unix_socket(runtime, tmp_path):
    path = tmp_path / "oip.sock"
    with (
        InferenceServer(runtime, f"unix:{path}", LIMIT),
        httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://agent") as client,
    ):
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/digits").json()["name"] == "digits"
        response = client.post("/v2/models/digits/infer", content=json_infer_body())
        assert response.status_code == 200, response.text
        out = {o["name"]: o for o in response.json()["outputs"]}
        got = np.array(out["probabilities"]["data"], np.float32).reshape(out["probabilities"]["shape"])
        assert np.allclose(got, expected(runtime), atol=1e-6)
    assert not path.exists()


@pytest.mark.parametrize(
    "path, body, headers, status, message",
    [
        ("/v2/models/digits/infer", json_infer_body(shape=(2, 63), data=[0.0] * 126), {}, 400, "shape [2, 63]"),
        ("/v2/models/digits/infer", json_infer_body(datatype="FP64"), {}, 400, "datatype FP64"),
        ("/v2/models/digits/infer", json_infer_body(datatype="COMPLEX"), {}, 400, "datatype 'COMPLEX'"),
        ("/v2/models/digits/infer", json_infer_body(data=[1.0, 2.0]), {}, 400, "has 2 values"),
        ("/v2/models/digits/infer", json_infer_body(data=["a"] * 128), {}, 400, "does not convert"),
        ("/v2/models/digits/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
        ("/v2/models/digits/infer", b"[]", {}, 400, "JSON object"),
        ("/v2/models/digits/infer", json_infer_body(outputs=[{"name": "nope"}]), {}, 400, "unknown output 'nope'"),
        ("/v2/models/digits/infer", BINARY_HEADER + b"\0" * 100,
         {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400, "declares 512 binary bytes"),
        ("/v2/models/digits/infer", json_infer_body(), {"Inference-Header-Content-Length": "99999"}, 400,
         "exceeds the body"),
        ("/v2/models/digits/infer", b"x" * 10, {"Content-Encoding": "br"}, 415, "Content-Encoding 'br'"),
        ("/v2/models/digits/infer", gzip.compress(b" " * (LIMIT + 10)), {"Content-Encoding": "gzip"}, 413,
         "decompressed request exceeds"),
        ("/v2/models/other/infer", json_infer_body(), {}, 404, "unknown model 'other'"),
        ("/v2/models/digits/versions/9/infer", json_infer_body(), {}, 404, "no version '9'"),
        ("/v2/nothing", b"{}", {}, 404, "no such endpoint"),
        # element counts past int64 (numpy's product wraps to 0 or raises), and past the request's bytes
        ("/v2/models/digits/infer", json_infer_body(shape=(2**62, 4), data=[]), {}, 400, "declares shape"),
        ("/v2/models/digits/infer", json_infer_body(shape=(2**70,), data=[]), {}, 400, "declares shape"),
        ("/v2/models/digits/infer", json_infer_body(shape=(2**20, 2**20), data=[]), {}, 400, "at most 65536 bytes"),
        ("/v2/models/digits/infer", json_infer_body(shape=[1] * 100, data=[1.0]), {}, 400, "100 dimensions"),
        # nested past the parser's recursion limit, as the whole body and inside an input's data
        ("/v2/models/digits/infer", b"[" * 30_000 + b"]" * 30_000, {}, 400, "nested deeper than 64"),
        ("/v2/models/digits/infer", json_infer_body(data="DATA").replace(b'"DATA"', b"[" * 20_000 + b"]" * 20_000),
         {}, 400, "nested deeper than 64"),
        ("/v2/models/digits/infer", b"[" * 60_000, {}, 400, "not valid JSON"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, runtime, path, body, headers, status, message):
    code, answer, _ = post(server, path, body, headers)
    assert code == status
    assert message in answer["error"] and "\n" not in answer["error"]
    assert_still_serving(server, runtime)


def test_oversized_body_is_refused_from_content_length_without_reading_it(server, runtime):
    # Announce far more than the limit and send almost nothing: the answer must come anyway.
    reply = raw_exchange(server, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 1000000000\r\n\r\n{")
    assert reply.startswith("HTTP/1.1 413") and "limit is 65536" in reply and "Connection: close" in reply
    assert_still_serving(server, runtime)


def raw_exchange(server, request: bytes) -> str:
    host, port = server.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply.decode()


def test_chunked_body_is_refused(server, runtime):
    reply = raw_exchange(server, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert reply.startswith("HTTP/1.1 411") and "send Content-Length" in reply
    assert_still_serving(server, runtime)


def test_not_ready_without_a_model(tmp_path):
    with InferenceServer(ModelRuntime(), "127.0.0.1:0", LIMIT) as srv, httpx.Client(base_url=srv.url) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/digits/ready").status_code == 404


def test_address_in_use_is_one_clear_error(runtime):
    with InferenceServer(runtime, "127.0.0.1:0", LIMIT) as first:
        port = first.url.rsplit(":", 1)[1]
        with pytest.raises(Exception, match=f"cannot serve on 127.0.0.1:{port}"):
            InferenceServer(runtime, f"127.0.0.1:{port}", LIMIT).start()


def slow_body(server, declared: int = 60_000, sent: bytes = b"[") -> socket.socket:
    """A connection that declares a body and sends only part of it."""
    host, port = server.url[len("http://"):].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n" % declared + sent)
    return sock


def reply_of(sock: socket.socket) -> str:
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply.decode()


def test_a_body_not_received_within_the_deadline_gets_408(runtime):
    limits = ConnectionLimits(body_timeout_s=0.5)
    with InferenceServer(runtime, "127.0.0.1:0", LIMIT, limits=limits) as srv:
        started = time.monotonic()
        with slow_body(srv) as sock:
            reply = reply_of(sock)
        assert reply.startswith("HTTP/1.1 408") and "not received within 0.5s (1 of 60000 bytes)" in reply
        assert time.monotonic() - started < 5
        assert_still_serving(srv, runtime)


def test_bodies_in_memory_at_once_are_capped_and_the_rest_get_503(runtime):
    limits = ConnectionLimits(max_bodies=1, body_wait_s=0.2, body_timeout_s=30)
    with InferenceServer(runtime, "127.0.0.1:0", LIMIT, limits=limits) as srv:
        holder = slow_body(srv)
        time.sleep(0.2)  # it holds the only body slot
        code, answer, _ = post(srv, "/v2/models/digits/infer", json_infer_body())
        assert code == 503 and "1 requests are being answered" in answer["error"]
        assert httpx.get(f"{srv.url}/v2/health/live").status_code == 200  # bodiless requests still answered
        holder.close()
        wait_for(lambda: post(srv, "/v2/models/digits/infer", json_infer_body())[0] == 200)
        assert_still_serving(srv, runtime)


def test_connections_past_the_cap_get_503_at_once(runtime):
    with InferenceServer(runtime, "127.0.0.1:0", LIMIT, limits=ConnectionLimits(max_connections=3)) as srv:
        host, port = srv.url[len("http://"):].split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        time.sleep(0.2)
        with socket.create_connection((host, int(port)), timeout=10) as extra:
            reply = reply_of(extra)
        assert reply.startswith("HTTP/1.1 503") and "already has 3 connections open" in reply
        for sock in idle:
            sock.close()
        wait_for(lambda: httpx.get(f"{srv.url}/v2/health/live").status_code == 200)
        assert_still_serving(srv, runtime)


def test_slow_connections_declaring_large_bodies_do_not_grow_memory(runtime):
    """30 connections each declaring 16 MB and sending 6 MB: at most max_bodies bodies are held."""
    def rss_mb() -> float:
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

    limits = ConnectionLimits(max_bodies=2, body_wait_s=30)
    with InferenceServer(runtime, "127.0.0.1:0", 16 << 20, limits=limits) as srv:
        payload = memoryview(b"[" * (6 << 20))
        before = rss_mb()
        socks = [slow_body(srv, 16 << 20) for _ in range(30)]

        def send(sock: socket.socket) -> None:
            try:
                sock.sendall(payload)
            except OSError:
                pass

        senders = [threading.Thread(target=send, args=(s,), daemon=True) for s in socks]
        for t in senders:
            t.start()
        time.sleep(3)
        grown = rss_mb() - before
        for sock in socks:
            sock.close()
        assert grown < 60, f"RSS grew {grown:.0f} MB"  # unbounded: 30 x 6 = 180 MB
        assert_still_serving(srv, runtime)


@pytest.mark.parametrize(
    "head, status, message",
    [
        (b"GARBAGE\r\n\r\n", 400, "bad request line"),
        (b"GET /v2 HTTP/2.0\r\n\r\n", 400, "speaks HTTP/1.1"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "request line longer"),
        (b"GET /v2 HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "more than 100 headers"),
        # request smuggling shapes: a space before the colon, two lengths
        (b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Length : 2\r\n\r\n{}", 400, "malformed header"),
        (b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
         "content-length is given twice"),
        (b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", 411, "send a Content-Length"),
    ],
)
def test_malformed_heads_get_a_4xx_and_close(server, runtime, head, status, message):
    reply = raw_exchange(server, head)  # returns once the server closed the connection
    assert reply.startswith(f"HTTP/1.1 {status}") and message in reply and "Connection: close" in reply
    assert_still_serving(server, runtime)


def test_keep_alive_expect_continue_and_http10(server, runtime):
    body = json_infer_body()
    host, port = server.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        # curl's way with large bodies: the head alone, the body only after "100 Continue"
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n" and reader.readline() == b"\r\n"
        sock.sendall(body)
        assert read_answer(reader)[0] == 200
        # the same connection serves a GET, then an HTTP/1.0 request asking to be kept open
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert read_answer(reader) == (200, {"live": True}, False)
        sock.sendall(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_answer(reader) == (200, {"live": True}, False)
        # a GET carrying a body it does not read: answered, then closed (the body is not parsed as a request)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nContent-Length: 5\r\n\r\nGET /")
        assert read_answer(reader) == (200, {"live": True}, True)
        assert reader.read() == b""


def read_answer(reader) -> tuple[int, dict, bool]:
    """(status, JSON body, whether the server said it closes) of one answer on a kept-alive connection."""
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    body = reader.read(int(headers["content-length"]))
    return status, json.loads(body), headers.get("connection") == "close"


def test_concurrent_keep_alive_clients_each_get_their_own_answer(server, runtime):
    inputs = [np.random.default_rng(seed).random((1, 64), dtype=np.float32) for seed in range(6)]
    results: dict[int, list[bool]] = {}

    def client(i: int) -> None:
        conn = triton.InferenceServerClient(server.url[len("http://"):])
        try:
            tensor = triton.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(inputs[i])
            want = runtime.active.run({"input": inputs[i]})["probabilities"]
            results[i] = [np.allclose(conn.infer("digits", [tensor]).as_numpy("probabilities"), want, atol=1e-6)
                          for _ in range(30)]
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: all(ok) for i, ok in results.items()} == dict.fromkeys(range(len(inputs)), True)
