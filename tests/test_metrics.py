"""Prometheus metrics scraped over HTTP: a real `fleetctl controller run` process (embedded
broker, a device reporting over MQTT), a controller API following a rollout, the agent's
server, and the Grafana dashboard's queries against what they serve."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from demo.scenario import write_config
from edgefleet.agent.metrics import agent_registry
from edgefleet.agent.runtime import ModelRuntime
from edgefleet.agent.serve import InferenceServer
from edgefleet.common.protocol import ExecutionState as E
from edgefleet.common.protocol import ModelRef
from edgefleet.controller.cli import main
from edgefleet.controller.rollout import engine
from tests.conftest import free_port
from tests.rollout_fleet import RecordingPublisher, seed
from tests.support.api_server import running_controller
from tests.support.metrics import Scrape, scrape
from tests.support.units import units_serving
from tests.test_controller_service import Controller, enroll_device, mqtt_session, report_online
from tests.test_engine import say

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "edgefleet.json"


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries read."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\b((?:edgefleet|process)_[a-z_]+)\b", e)}


@pytest.fixture
def agent_scrape(tmp_path, digits) -> Scrape:
    """The agent server's /metrics (as `fleet-agent run` wires it) after one request."""
    runtime = ModelRuntime()
    runtime.swap(runtime.load(digits.model, ModelRef(model="digits", version="1.0.0", variant="cpu-fp32")))

    units = units_serving(tmp_path / "state", "digits", runtime)
    registry = agent_registry(units, "pi-1", "0.1.0")
    with InferenceServer(units.served, "127.0.0.1:0", 1 << 20, registry=registry) as server:
        answer = httpx.post(f"{server.url}/v2/models/digits/infer", timeout=10, json={
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})
        assert answer.status_code == 200, answer.text
        return scrape(f"{server.url}/metrics")


def test_controller_process_metrics_need_a_token_and_follow_devices(tmp_path, agent_scrape):
    """Also its log: every line one JSON object (--log-format json), uvicorn's included."""
    controller = Controller(tmp_path / "home", free_port(), tmp_path / "controller.log")
    write_config(controller.home, int(controller.url.rsplit(":", 1)[1]), embedded_broker_port=free_port())
    controller.fleetctl("init")
    controller.extra_env = {"EDGEFLEET_LOG_FORMAT": "json"}
    controller.start()
    try:
        viewer = json.loads(controller.fleetctl("tokens", "create", "prometheus", "--role", "viewer",
                                                "--format", "json"))["token"]
        refused = httpx.get(f"{controller.url}/metrics")
        assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
        before = scrape(f"{controller.url}/metrics", viewer)
        assert before.value("edgefleet_controller_devices", hardware_class="x86_64", status="online") == 0
        assert before.value("edgefleet_controller_rollouts", state="RUNNING") == 0

        enrolled = enroll_device(controller, "pi-metrics")
        mqtt = enrolled["mqtt"]
        client = mqtt_session(mqtt["url"], mqtt["username"], mqtt["password"])
        assert client is not None, controller.tail()
        try:
            report_online(client, "pi-metrics")
            deadline = time.monotonic() + 20
            while True:
                after = scrape(f"{controller.url}/metrics", viewer)
                if after.value("edgefleet_controller_devices", hardware_class="x86_64", status="online") == 1:
                    break
                assert time.monotonic() < deadline, f"device never counted online:\n{controller.tail()}"
                time.sleep(0.2)
        finally:
            client.loop_stop()
            client.disconnect()
        assert after.value("edgefleet_controller_mqtt_messages_received_total") >= 2
        assert after.value("edgefleet_controller_ingest_messages_total", result="applied") >= 2
        assert after.value("edgefleet_controller_ingest_backlog") == 0
        assert after.value("edgefleet_controller_outbox_depth") == 0
        missing = dashboard_metrics() - after.names - agent_scrape.names
        assert not missing, f"the Grafana dashboard queries metrics nobody serves: {sorted(missing)}"
    finally:
        assert controller.stop() == 0
    logged = [json.loads(line) for line in controller.log.read_text().splitlines()]
    assert {"uvicorn.error", "edgefleet.controller.embedded_broker"} <= {e["logger"] for e in logged}
    assert any(e["message"].startswith("Uvicorn running on") and e["priority"] == 6 for e in logged)
    assert not [e for e in logged if "exc" in e or e["priority"] <= 3]


def test_rollout_metrics_follow_executions_and_gates(tmp_path):
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}") as api:
        seed(api.db)
        result = CliRunner().invoke(main, [
            "deploy", "digits:1.1.0", "--to", "site in (berlin,paris)", "--stages", "30%,100%", "--bake", "0s",
            "--name", "canary-1", "--controller", api.url, "--token", api.token])
        assert result.exit_code == 0, result.output
        url = f"{api.url}/metrics"
        assert scrape(url, api.token).value("edgefleet_controller_rollouts", state="PENDING") == 1
        publisher = RecordingPublisher()
        publisher.fail = True  # the broker is away: the desired states are committed and owed
        engine.step_all(api.db, publisher)
        started = scrape(url, api.token)
        assert started.value("edgefleet_controller_rollouts", state="RUNNING") == 1
        assert started.value("edgefleet_controller_executions", rollout="canary-1", state="QUEUED") == 2
        assert started.value("edgefleet_controller_outbox_depth") == 2
        publisher.fail = False
        engine.step_all(api.db, publisher)
        assert scrape(url, api.token).value("edgefleet_controller_outbox_depth") == 0
        for desired in publisher.sent:
            say(api.db, desired.device, E.SUCCEEDED, "canary-1", desired.generation)
        engine.step_all(api.db, publisher)
        passed = scrape(url, api.token)
        assert passed.value("edgefleet_controller_executions", rollout="canary-1", state="SUCCEEDED") == 2
        gate = {"rollout": "canary-1", "stage": "1", "hardware_class": "x86_64", "gate": "failure_rate"}
        assert passed.value("edgefleet_controller_gate_value", **gate) == 0.0
        assert passed.value("edgefleet_controller_gate_threshold", **gate) > 0
