"""Two models on one device, end to end: a real controller (embedded broker) rolls out the digits
classifier and PP-OCR's text-direction classifier to one real `fleet-agent run` process at once.

Each model has its own rollout, hot-swap and rollback: unmodified tritonclient (HTTP and gRPC)
reaches both by name on the daemon; digits is hot-swapped to 1.1.0 under load on both models with
no failed request; rolling that rollout back moves digits only; the device's report carries one
entry per model with the memory its session took.
"""
from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from demo.scenario import AgentProcess, Controller, Fleetctl, wait_for, wait_for_fleet, wait_rollout, write_config
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtime import ModelRuntime
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROLLOUT = ["--stages", "100%", "--bake", "0s", "--device-timeout", "2m", "--max-p99-regression", "1000%"]
DIGITS = np.random.default_rng(8).random((2, 64), dtype=np.float32)
LINES = np.random.default_rng(9).random((2, 3, 48, 192), dtype=np.float32)


def build(fleetctl: Fleetctl, model: Path, name: str, version: str, eval_data: Path, out: Path) -> None:
    fleetctl("bundle", "build", str(model), "--name", name, "--version", version, "--variant", "cpu-fp32",
             "--eval", str(eval_data), "-o", str(out))
    fleetctl("bundle", "publish", str(out))


@pytest.fixture
def device(tmp_path, model_cache, digits, ocr_models):
    from bench import ocr

    home, api_port = tmp_path / "home", free_port()
    write_config(home, api_port, embedded_broker_port=free_port())
    fleetctl = Fleetctl(home, echo=print)
    fleetctl("init")
    textdir = ocr.task_set(model_cache, "cls", 40, 4)
    for version in ("1.0.0", "1.1.0"):
        build(fleetctl, digits.model, "digits", version, digits.eval_data, tmp_path / f"digits-{version}")
    build(fleetctl, textdir.model, "textdir", "1", textdir.eval_data, tmp_path / "textdir-1")
    controller = Controller(home, f"http://127.0.0.1:{api_port}").start()
    agent = AgentProcess(f"two-{uuid.uuid4().hex[:6]}", "x86_64", tmp_path / "agent", free_port())
    try:
        agent.enroll(fleetctl, controller.url)
        config = AgentConfig.load(agent.config_path)
        config.serve_grpc = f"127.0.0.1:{free_port()}"
        agent.config_path.write_text(config.to_toml())
        agent.start()
        wait_for_fleet(fleetctl, {agent.name: "x86_64"})
        yield fleetctl, agent, config.serve_grpc, {"digits": digits.model, "textdir": textdir.model}
    finally:
        agent.stop()
        controller.stop()


def raw_outputs(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    runtime = ModelRuntime()
    try:
        loaded = runtime.load(model)
        return loaded.run({loaded.inputs[0].name: x})
    finally:
        runtime.close()


def infer(module, client, model: str, x: np.ndarray) -> Any:
    name = "input" if model == "digits" else "x"
    tensor = module.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor])


def deployed(fleetctl: Fleetctl, target: str, name: str) -> None:
    fleetctl("deploy", target, "--to", "hw.class=x86_64", "--name", name, *ROLLOUT)  # this fleet's one device


def models_reported(fleetctl: Fleetctl, device: str) -> dict[str, dict]:
    reported = fleetctl.json("devices", "show", device)["reported"] or {}
    return {m["model"]: m for m in reported.get("models", [])}


def test_two_models_roll_out_serve_swap_and_roll_back_independently(device):
    fleetctl, agent, grpc_address, files = device
    http_address = f"127.0.0.1:{agent.serve_port}"
    # two rollouts of two models on the same device, at once
    deployed(fleetctl, "digits:1.0.0", "d1")
    deployed(fleetctl, "textdir:1", "t1")
    for rollout in ("d1", "t1"):
        assert wait_rollout(fleetctl, rollout)["state"] == "SUCCEEDED", (fleetctl("rollout", "status", rollout),
                                                                         agent.log())
    reported = wait_for(lambda: (r := models_reported(fleetctl, agent.name)).keys() == {"digits", "textdir"}
                        and all(m["active"] for m in r.values()) and r, 30, "both models reported")
    assert reported["digits"]["active"]["version"] == "1.0.0" and reported["textdir"]["active"]["version"] == "1"
    assert all(m["memory_kb"] is not None for m in reported.values())
    assert reported["digits"]["generation"] != reported["textdir"]["generation"]  # each entry its own

    want = {"digits": raw_outputs(files["digits"], DIGITS), "textdir": raw_outputs(files["textdir"], LINES)}
    for module, address in ((triton_http, http_address), (triton_grpc, grpc_address)):
        client = module.InferenceServerClient(address)
        try:
            assert client.is_model_ready("digits") and client.is_model_ready("textdir")
            got = infer(module, client, "digits", DIGITS).as_numpy("probabilities")
            assert np.allclose(got, want["digits"]["probabilities"], atol=1e-6)
            out = next(iter(want["textdir"]))
            assert np.allclose(infer(module, client, "textdir", LINES).as_numpy(out), want["textdir"][out], atol=1e-5)
        finally:
            client.close()

    # digits hot-swaps to 1.1.0 while both models are under load: not one request fails
    failures: list[str] = []
    served = {"digits": 0, "textdir": 0}
    stop = threading.Event()

    def load(model: str) -> None:
        client = triton_http.InferenceServerClient(http_address)
        try:
            while not stop.is_set():
                try:
                    infer(triton_http, client, model, DIGITS if model == "digits" else LINES)
                    served[model] += 1
                except (InferenceServerException, OSError) as e:  # any failure is the finding
                    failures.append(f"{model}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=load, args=(m,)) for m in ("digits", "textdir")]
    for t in threads:
        t.start()
    try:
        deployed(fleetctl, "digits:1.1.0", "d2")
        assert wait_rollout(fleetctl, "d2")["state"] == "SUCCEEDED", agent.log()
        wait_for(lambda: agent.serving() == "1.1.0", 30, "digits 1.1.0 served")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == [] and served["digits"] > 0 and served["textdir"] > 0, (failures[:3], served)

    # rolling d2 back moves digits only
    fleetctl("rollout", "rollback", "d2")
    wait_for(lambda: agent.serving() == "1.0.0", 60, "digits back on 1.0.0", agent.log)
    after = wait_for(lambda: (r := models_reported(fleetctl, agent.name))["digits"]["active"]["version"] == "1.0.0"
                     and r, 30, "the rollback reported")
    assert after["textdir"]["active"]["version"] == "1"
    assert after["textdir"]["generation"] == reported["textdir"]["generation"], "textdir's entry never changed"
    client = triton_http.InferenceServerClient(http_address)
    try:
        assert client.get_model_metadata("textdir")["versions"] == ["1"]
    finally:
        client.close()
