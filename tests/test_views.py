"""The dashboard's read models (/v1/whoami, /v1/fleet, a rollout's live stage, a device's trends)
and the files it is served from, through a real API server."""
from __future__ import annotations

from datetime import timedelta

import pytest

from edgefleet.controller.api.views import quantile, traffic
from edgefleet.controller.db.models import Benchmark, Device, TelemetryRecord, utcnow
from tests.rollout_fleet import seed
from tests.support.api_server import running_controller

MODEL = {"model": "digits", "version": "1.0.0", "variant": "cpu-int8", "release": 1}
BUCKETS = [1.0, 2.0, 5.0]


def counters(requests: int, failures: int, latency: list[int], since: float = 100.0) -> dict:
    return {"requests": requests, "rejected": 0, "failures": failures, "latency_buckets_ms": BUCKETS,
            "latency_counts": latency, "model": MODEL, "since": since}


@pytest.fixture
def api(tmp_path):
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}") as running:
        seed(running.db)
        yield running


def test_quantile_interpolates_within_its_bucket_and_stops_at_the_last_bound():
    assert quantile((1.0, 2.0, 5.0), [10, 10, 0, 0], 0.5) == 1.0
    assert quantile((1.0, 2.0, 5.0), [0, 10, 0, 0], 0.5) == 1.5
    assert quantile((1.0, 2.0, 5.0), [0, 0, 0, 4], 0.99) == 5.0  # all past the last bound: that bound
    assert quantile((1.0, 2.0), [0, 0, 0], 0.5) is None


def test_traffic_is_the_growth_between_reports_of_one_model_load():
    now = utcnow()
    rows = [
        (now, 1, counters(10, 0, [10, 0, 0, 0])),
        (now + timedelta(seconds=5), 1, counters(30, 2, [10, 20, 0, 0])),
        (now + timedelta(seconds=6), 1, {"shape": "of an older release"}),   # skipped, not fatal
        (now + timedelta(seconds=10), 1, counters(5, 0, [0, 0, 5, 0], since=200.0)),  # a new load: no growth yet
        (now + timedelta(seconds=15), 1, counters(9, 1, [0, 0, 9, 0], since=200.0)),
    ]
    points = traffic(rows)
    assert [(p["requests"], p["errors"]) for p in points] == [(20, 2), (4, 1)]
    assert points[0]["p50_ms"] == 1.5 and points[1]["p99_ms"] == pytest.approx(2.0 + 3.0 * 0.99)
    assert points[0]["version"] == "1.0.0"


def test_whoami_and_the_fleet_at_a_glance(api):
    ocr = {"model": "ocr-cls", "generation": 2, "memory_kb": 9000,
           "active": {"model": "ocr-cls", "version": "2", "variant": "cpu-int8", "release": 1}}
    with api.db.unit_of_work() as session:
        session.get_one(Device, "p2").online = False
        p1 = session.get_one(Device, "p1")
        p1.reported = {**p1.reported, "models": [*p1.reported["models"], ocr]}  # p1 serves a second model
    with api.client() as client:
        assert client.get("/v1/whoami").json() == {"name": "admin", "role": "admin", "controls": True}
        fleet = client.get("/v1/fleet").json()
        p1_active = client.get("/v1/devices/p1").json()["active"]
    assert (fleet["devices"], fleet["online"]) == (6, 5)
    by_class = {c["hardware_class"]: c for c in fleet["classes"]}
    assert by_class["rpi-4"] == {"hardware_class": "rpi-4", "devices": 3, "online": 2,
                                 "serving": {"digits 1.0.0 cpu-fp32": 3, "ocr-cls 2 cpu-int8": 1}}
    assert [(m["model"], m["version"], m["memory_kb"]) for m in p1_active] == [
        ("digits", "1.0.0", None), ("ocr-cls", "2", 9000)]
    assert by_class["x86_64"]["serving"] == {"digits 1.0.0 cpu-int8": 3}


def test_a_rollouts_live_view_offers_the_controls_its_state_allows(api):
    manifest = {"apiVersion": "edgefleet/v1", "kind": "Rollout", "metadata": {"name": "r1"},
                "spec": {"model": "digits", "version": "1.1.0", "selector": "site=berlin", "stages": ["100%"],
                         "bake": "30s"}}
    with api.client() as client:
        assert client.post("/v1/rollouts", json={"manifest": manifest}).status_code == 201
        live = client.get("/v1/rollouts/r1/live").json()
        assert live["controls"] == ["pause", "abort"] and live["bake_s"] == 30 and live["gates"] == []
        assert [e["text"] for e in live["timeline"]] == ["created by operator:admin"]
        assert client.post("/v1/rollouts/r1/pause").status_code == 200
        live = client.get("/v1/rollouts/r1/live").json()
        assert live["controls"] == ["resume", "promote", "abort", "rollback"]
        assert live["timeline"][0]["text"] == "pause by operator:admin"
        missing = client.get("/v1/rollouts/nope/live")
        assert missing.status_code == 404 and "rollout 'nope' not found" in missing.json()["error"]


def test_device_trends(api):
    now = utcnow()
    with api.db.unit_of_work() as session:
        for seq, (requests, latency) in enumerate([(10, [10, 0, 0, 0]), (20, [10, 10, 0, 0])]):
            session.add(TelemetryRecord(device_id="x1", kind="counters", boot=1, seq=seq,
                                        data=counters(requests, 0, latency), ts=now + timedelta(seconds=seq)))
        session.add(Benchmark(device_id="x1", hardware_class="x86_64", model="digits", version="1.0.0",
                              variant="cpu-int8", p50_ms=0.5, p99_ms=1.5))
    with api.client() as client:
        trends = client.get("/v1/devices/x1/trends").json()
        assert [(p["requests"], p["p50_ms"]) for p in trends["traffic"]] == [(10, 1.5)]
        assert [b["p99_ms"] for b in trends["benchmarks"]] == [1.5]
        assert client.get("/v1/devices/nobody/trends").status_code == 404


def test_the_dashboard_and_the_api_docs_are_served_by_the_controller(api):
    with api.client(token=None) as client:
        assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and "/ui/static/app.js" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = client.get("/ui/static/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/static/index.html").status_code == 404   # only the named files
        assert client.get("/ui/static/..%2Fviews.py").status_code == 404
        docs = client.get("/docs")
        assert "/ui/static/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
        bundle = client.get("/ui/static/swagger-ui-bundle.js")
        assert bundle.status_code == 200 and len(bundle.content) > 500_000
        assert client.get("/redoc").status_code == 404  # it would load from a CDN
        assert client.get("/v1/fleet").status_code == 401  # the data needs a token
