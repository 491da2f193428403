"""Sampling policies, caps, the on-disk buffer and the uploader."""
from __future__ import annotations

import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import numpy as np
import pytest

from edgefleet.agent.errors import RemoteError, TransportError
from edgefleet.agent.runtime import ModelRuntime
from edgefleet.agent.sampler import Sampler, confidence, controller_poster, read_meta
from edgefleet.agent.serve import InferenceServer
from edgefleet.common.protocol import ModelRef, SamplingPolicy
from tests.support.mqtt import wait_until

REF = ModelRef(model="digits", version="2.0.0", variant="cpu-fp32")
X = {"input": np.full((1, 64), 0.5, np.float32)}
CONFIDENT = {"probabilities": np.array([[0.97, 0.01, 0.01, 0.01]], np.float32)}
UNSURE = {"probabilities": np.array([[0.5, 0.4, 0.05, 0.05]], np.float32)}  # top1 0.5, margin 0.1


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(tmp_path, clock=None, max_buffer_bytes=10_000_000, **policy) -> Sampler:
    sampling = SamplingPolicy(enabled=True, **policy)
    return Sampler(sampling, tmp_path / "samples", device="dev-1", max_buffer_bytes=max_buffer_bytes,
                   clock=clock or Clock(), rng=random.Random(7))


def reasons(sampler: Sampler) -> list[str]:
    return [read_meta(p, 10_000_000).reason for p in sampler.pending()]


def test_off_switch_keeps_nothing(tmp_path):
    sampler = Sampler(SamplingPolicy(enabled=False, rate=1.0), tmp_path / "s")
    assert sampler.observe(X, UNSURE, REF) is None
    assert sampler.pending() == []


def test_fixed_rate(tmp_path):
    every = make(tmp_path / "a", rate=1.0)
    for _ in range(5):
        assert every.observe(X, CONFIDENT, REF) == "rate"
    assert reasons(every) == ["rate"] * 5
    some = make(tmp_path / "b", rate=0.25)
    kept = sum(some.observe(X, CONFIDENT, REF) is not None for _ in range(80))
    assert 5 < kept < 40 and len(some.pending()) == kept


def test_low_confidence_and_low_margin(tmp_path):
    assert confidence(UNSURE) == pytest.approx((0.5, 0.1))
    assert confidence({"label": np.array([3])}) is None
    by_top1 = make(tmp_path / "a", low_confidence_below=0.6)
    assert by_top1.observe(X, CONFIDENT, REF) is None
    assert by_top1.observe(X, UNSURE, REF) == "low_confidence"
    by_margin = make(tmp_path / "b", low_margin_below=0.2)
    assert by_margin.observe(X, CONFIDENT, REF) is None
    assert by_margin.observe(X, UNSURE, REF) == "low_margin"
    meta = read_meta(by_margin.pending()[0], 1_000_000)
    assert (meta.model, meta.version, meta.variant, meta.device) == ("digits", "2.0.0", "cpu-fp32", "dev-1")
    assert meta.top1 == pytest.approx(0.5) and meta.margin == pytest.approx(0.1)


def test_reservoir_keeps_k_per_window_and_flushes_when_the_window_ends(tmp_path):
    clock = Clock(1000.0)
    sampler = make(tmp_path, clock, reservoir_per_window=3, window_s=60)
    for i in range(50):
        sampler.observe({"input": np.full((1, 64), i, np.float32)}, CONFIDENT, REF)
    assert sampler.pending() == []  # held until the window closes
    clock.now += 60
    assert reasons(sampler) == ["reservoir"] * 3
    kept = {int(np.load(p, allow_pickle=False)["input/input"][0, 0]) for p in sampler.pending()}
    assert len(kept) == 3 and kept <= set(range(50))


def test_caps_per_hour_and_bytes_per_day(tmp_path):
    clock = Clock(3600.0 * 100)
    hourly = make(tmp_path / "a", clock, rate=1.0, max_per_hour=4)
    assert sum(hourly.observe(X, CONFIDENT, REF) is not None for _ in range(10)) == 4
    clock.now += 3600
    assert hourly.observe(X, CONFIDENT, REF) == "rate"
    size = hourly.pending()[0].stat().st_size
    daily = make(tmp_path / "b", clock, rate=1.0, max_bytes_per_day=int(size * 2.5))
    assert sum(daily.observe(X, CONFIDENT, REF) is not None for _ in range(10)) == 2
    assert daily.dropped == 8


def test_buffer_bound_drops_oldest_first(tmp_path):
    clock = Clock()
    probe = make(tmp_path / "probe", clock, rate=1.0)
    probe.observe(X, CONFIDENT, REF)
    size = probe.pending()[0].stat().st_size
    sampler = make(tmp_path / "s", clock, rate=1.0, max_buffer_bytes=int(size * 3.5))
    for _ in range(6):
        clock.now += 1
        sampler.observe(X, CONFIDENT, REF)
    kept = [read_meta(p, 1_000_000).ts for p in sampler.pending()]
    assert kept == [clock.now - 2, clock.now - 1, clock.now]


def test_buffer_and_caps_survive_a_restart(tmp_path):
    clock = Clock()
    first = make(tmp_path, clock, rate=1.0, max_per_hour=3, reservoir_per_window=0)
    for _ in range(3):
        first.observe(X, CONFIDENT, REF)
    (first.buffer_dir / ".half-written.npz.x1y2.tmp").write_bytes(b"partial")  # as atomic_write names it
    again = make(tmp_path, clock, rate=1.0, max_per_hour=3)
    assert len(again.pending()) == 3
    assert not list(again.buffer_dir.glob(".*"))
    assert again.observe(X, CONFIDENT, REF) is None  # the hour's cap was already spent


def test_reservoir_slots_survive_a_restart(tmp_path):
    clock = Clock()
    first = make(tmp_path, clock, reservoir_per_window=2, window_s=3600)
    for _ in range(5):
        first.observe(X, CONFIDENT, REF)
    assert first.pending() == []
    again = make(tmp_path, clock, reservoir_per_window=2, window_s=3600)
    assert reasons(again) == ["reservoir", "reservoir"]


def test_upload_deletes_only_after_success(tmp_path):
    sampler = make(tmp_path, rate=1.0)
    for _ in range(5):
        sampler.observe(X, CONFIDENT, REF)
    posted: list[tuple[bytes, dict]] = []

    def flaky(data: bytes, meta: dict) -> None:
        if len(posted) == 2:
            raise TransportError("controller unreachable")
        posted.append((data, meta))

    assert sampler.upload_pending(flaky) == 2
    assert len(sampler.pending()) == 3
    assert posted[0][1]["model"] == "digits" and posted[0][0][:2] == b"PK"

    def refuse_first(data: bytes, meta: dict) -> None:
        if not refused:
            refused.append(meta)
            raise RemoteError("HTTP 400")

    refused: list[dict] = []
    assert sampler.upload_pending(refuse_first) == 2  # the refused one is dropped, the rest go
    assert sampler.pending() == []


class _Collector(BaseHTTPRequestHandler):
    status = 204
    received: ClassVar[list] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, dict(self.headers), body))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector():
    _Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_controller_poster_over_real_http(tmp_path, collector):
    sampler = make(tmp_path, rate=1.0)
    sampler.observe(X, CONFIDENT, REF)
    body = sampler.pending()[0].read_bytes()
    post = controller_poster(f"http://127.0.0.1:{collector.server_port}", "dev-1", "tok", timeout_s=5)

    _Collector.status = 500
    assert sampler.upload_pending(post) == 0 and len(sampler.pending()) == 1
    _Collector.status = 204
    assert sampler.upload_pending(post) == 1 and sampler.pending() == []
    path, headers, received = _Collector.received[-1]
    assert path == "/v1/devices/dev-1/samples" and received == body
    assert headers["Authorization"] == "Bearer tok"
    assert (headers["X-Edgefleet-Model"], headers["X-Edgefleet-Version"], headers["X-Edgefleet-Variant"]) == (
        "digits", "2.0.0", "cpu-fp32")
    _Collector.status = 413
    with pytest.raises(RemoteError, match="HTTP 413"):
        post(body, _meta())
    unreachable = controller_poster("http://127.0.0.1:9", "dev-1", "tok", timeout_s=2)
    with pytest.raises(TransportError):
        unreachable(body, _meta())


def _meta() -> dict:
    return {"model": "digits", "version": "2.0.0", "variant": "cpu-fp32", "device": "dev-1", "ts": 0.0,
            "reason": "rate", "top1": None, "margin": None}


def test_server_hook_samples_real_requests(tmp_path, digits):
    runtime = ModelRuntime()
    runtime.swap(runtime.load(digits.model, REF))
    sampler = make(tmp_path, rate=1.0)
    data = np.load(digits.eval_data)["input"][:1]
    with InferenceServer(runtime, "127.0.0.1:0", 1 << 20, on_inference=sampler.on_inference) as server:
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": data.ravel().tolist()}]}
        assert httpx.post(f"{server.url}/v2/models/digits/infer", json=body).status_code == 200
        assert wait_until(sampler.pending, 10)  # the hook runs once the answer is out
    [path] = sampler.pending()
    with np.load(path, allow_pickle=False) as record:
        assert np.array_equal(record["input/input"], data)
        assert record["output/probabilities"].shape == (1, 10)
        probabilities = record["output/probabilities"][0]
    meta = read_meta(path, 1 << 20)  # recorded with any kept sample: the controller indexes it
    assert meta.top1 == pytest.approx(float(probabilities.max()))
    assert 0 <= meta.margin <= meta.top1
