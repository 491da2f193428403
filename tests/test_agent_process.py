"""A real `fleet-agent run` process against a real broker (Mosquitto) and a real
signed repository served over HTTP: update, swap under load, rollbacks, bad inputs."""
import json
import resource
import signal
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgefleet.common.protocol import Action, Gate, SamplingPolicy
from tests.conftest import free_port
from tests.support.fleet import (
    AgentProcess,
    Load,
    ModelRepo,
    Observer,
    agent_config,
    desired,
)
from tests.support.metrics import scrape
from tests.support.repo_server import Faults

STRICT = Gate(bench_seconds=0.3, bench_min_queries=50, max_p99_regression=1.0)  # slow's p50 alone is ~15x digits
LENIENT = Gate(bench_seconds=0.05, bench_min_queries=5, max_p99_regression=1000.0)  # "big" is the slow model


@pytest.fixture(scope="module")
def repo(tmp_path_factory, digits, wrong_model, slow_model):
    eval_inputs = np.load(digits.eval_data)["input"]
    signed = ModelRepo.create(tmp_path_factory.mktemp("fleet"), eval_inputs, digits.model)
    signed.infos = {
        "v1": signed.publish(digits.model, "1.0.0"),
        "v2": signed.publish(digits.model, "2.0.0"),
        "wrong": signed.publish(wrong_model, "3.0.0-wrong"),
        "slow": signed.publish(slow_model, "4.0.0-slow"),
        "arm": signed.publish(digits.model, "5.0.0", variant="arm-int8",
                              requirements={"arch": ["riscv64"], "providers": ["CPUExecutionProvider"]}),
        "v6": signed.publish(digits.model, "6.0.0"),
        "big": signed.publish(slow_model, "7.0.0-big"),
        "big2": signed.publish(slow_model, "8.0.0-big"),
    }
    yield signed
    signed.stop()


class Device:
    """One simulated device: its agent process and an observer on its topics."""

    def __init__(self, tmp_path: Path, repo: ModelRepo, broker: str, preexec=None, env=None, **config):
        self.config = agent_config(tmp_path / "state", repo, broker, f"127.0.0.1:{free_port()}", **config)
        self.agent = AgentProcess(self.config, tmp_path, preexec=preexec, env=env)
        self.observer = Observer(broker, self.config.device_id, repo.seal)
        self.generation = 0

    def start(self) -> "Device":
        self.agent.start()
        self.agent.wait_live()
        return self

    def apply(self, info=None, timeout: float = 60.0, **fields) -> dict:
        """Publish a new desired state (retained) and wait for its terminal event."""
        self.generation += 1
        self.observer.publish(desired(self.config.device_id, self.generation, info, **fields))
        return self.observer.wait_terminal(self.generation, timeout)

    def close(self) -> None:
        self.agent.stop()
        self.observer.close()


@pytest.fixture
def device(tmp_path, repo, mosquitto_url):
    d = Device(tmp_path, repo, mosquitto_url).start()
    yield d
    d.close()


def test_update_then_swap_under_load_drops_nothing(device, repo):
    v1, v2, v6 = repo.infos["v1"], repo.infos["v2"], repo.infos["v6"]
    assert device.apply(v1)["state"] == "SUCCEEDED", device.agent.log()
    assert device.observer.states(1) == ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "SUCCEEDED"]
    assert device.agent.serving_version() == "1.0.0"
    with Load(device.agent) as load:
        device.observer.wait(lambda: load.ok > 20, 30, "requests before the swap")
        assert device.apply(v2)["state"] == "SUCCEEDED"
        assert device.apply(v6)["state"] == "SUCCEEDED"
        served = load.ok
        device.observer.wait(lambda: load.ok > served + 20, 30, "requests after the swap")
    assert load.failures == [], load.failures[:3]
    assert {"1.0.0", "2.0.0", "6.0.0"} <= load.versions or {"1.0.0", "6.0.0"} <= load.versions
    reported = device.observer.wait(
        lambda: (r := device.observer.model_report()) and r["active"] and r["active"]["version"] == "6.0.0" and r,
        10, "reported v6")
    assert reported["previous"]["version"] == "2.0.0" and reported["generation"] == 3
    assert reported["outcome"] == "SUCCEEDED" and reported["memory_kb"] is not None  # measured at load
    hardware = device.observer.reported["hardware"]
    assert hardware["arch"] and hardware["providers"]
    assert device.observer.telemetry("benchmark"), "gate results are sent as telemetry"
    assert device.observer.telemetry("heartbeat")


def test_rollbacks_on_failing_golden_set_and_slow_model(device, repo):
    assert device.apply(repo.infos["v1"])["state"] == "SUCCEEDED"
    wrong = device.apply(repo.infos["wrong"])
    assert wrong["state"] == "ROLLED_BACK" and "golden set failed" in wrong["detail"]
    assert device.agent.serving_version() == "1.0.0"
    slow = device.apply(repo.infos["slow"], gate=STRICT)
    assert slow["state"] == "ROLLED_BACK" and "regresses past" in slow["detail"], slow
    assert device.agent.serving_version() == "1.0.0"
    # the controller's rollback command, then the local CLI flips back again
    v2 = device.apply(repo.infos["v2"])
    assert v2["state"] == "SUCCEEDED", v2
    assert device.apply(action=Action.ROLLBACK)["state"] == "ROLLED_BACK"
    assert device.agent.serving_version() == "1.0.0"
    cli = subprocess.run([str(Path(sys.executable).parent / "fleet-agent"), "rollback", "--config",
                          str(device.agent.config_path)], capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    device.observer.wait(lambda: device.agent.serving_version() == "2.0.0", 10, "local rollback to be served")
    status = subprocess.run([str(Path(sys.executable).parent / "fleet-agent"), "status", "--config",
                             str(device.agent.config_path)], capture_output=True, text=True, timeout=30)
    assert json.loads(status.stdout)["models"]["digits"]["active"]["version"] == "2.0.0"


def test_bad_inputs_fail_or_reject_and_keep_serving(device, repo):
    assert device.apply(repo.infos["v1"])["state"] == "SUCCEEDED"
    unsigned = device.apply(model="digits", version="9.9.9", variant="cpu-fp32", target="digits/9.9.9/cpu-fp32.onnx")
    assert unsigned["state"] == "FAILED" and "not signed" in unsigned["detail"]
    other = device.apply(repo.infos["arm"])
    assert other["state"] == "REJECTED" and "riscv64" in other["detail"]
    # 404 then a stall: the agent stays DOWNLOADING and retries; fixed, it completes
    for big, fault in (("big", Faults(match="7.0.0-big", status=404)),
                       ("big2", Faults(match="8.0.0-big", stall_after=200_000))):
        repo.server.faults = fault
        try:
            device.generation += 1
            device.observer.publish(desired(device.config.device_id, device.generation, repo.infos[big], gate=LENIENT))
            retry = device.observer.wait(
                lambda: next((e for e in device.observer.events(device.generation) if "retrying" in e["detail"]), None),
                30, "a retry after the fault")
            assert retry["state"] == "DOWNLOADING"
        finally:
            repo.server.faults = Faults()
        done = device.observer.wait_terminal(device.generation, 60)
        assert done["state"] == "SUCCEEDED", (done["detail"], done["generation"], device.observer.states(done["generation"]), fault)
        assert device.agent.serving_version() == repo.infos[big].version
        assert device.apply(action=Action.ROLLBACK)["state"] == "ROLLED_BACK"  # back to v1 for the next fault
    assert device.agent.serving_version() == "1.0.0"
    assert device.agent.infer()["model_version"] == "1.0.0"


def test_disk_full_fails_the_update_and_keeps_serving(tmp_path, repo, mosquitto_url):
    """The agent runs with a file-size limit below the model's size: its download cannot be written."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    dev = Device(tmp_path, repo, mosquitto_url, preexec=limit_file_size).start()
    try:
        assert dev.apply(repo.infos["v1"])["state"] == "SUCCEEDED", dev.agent.log()
        full = dev.apply(repo.infos["big"])
        assert full["state"] == "FAILED" and "disk full" in full["detail"], full
        assert dev.agent.serving_version() == "1.0.0"
        staging = dev.config.state_dir / "models" / "digits" / "slots" / ".staging"
        assert staging.parent.is_dir() and not list(staging.glob("*"))
    finally:
        dev.close()


def test_restart_serves_at_once_and_talks_to_systemd(tmp_path, repo, mosquitto_url):
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    dev = Device(tmp_path, repo, mosquitto_url,
                 env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000"}).start()
    try:
        messages = {sock.recv(4096).decode() for _ in range(2)}
        assert any(m.startswith("READY=1") for m in messages), messages
        assert "WATCHDOG=1" in messages
        assert dev.apply(repo.infos["v1"], sampling=SamplingPolicy(enabled=True, rate=1.0))["state"] == "SUCCEEDED"
        dev.agent.infer()  # the desired state's sampling policy keeps it for retraining
        samples = dev.config.state_dir / "models" / "digits" / "samples"  # each model buffers its own
        dev.observer.wait(lambda: list(samples.glob("*.npz")), 10, "a buffered sample")
        first_boot = dev.observer.reported["boot"]
        assert dev.agent.stop() == 0, dev.agent.log()  # SIGTERM: clean exit
        dev.agent.start()
        dev.agent.wait_live()
        assert dev.agent.serving_version() == "1.0.0"  # from the active slot, before any message
        dev.observer.wait(lambda: dev.observer.reported["boot"] == first_boot + 1, 10, "the next boot's report")
    finally:
        dev.close()
        sock.close()


def test_metrics_follow_requests_and_updates(device, repo):
    """/metrics of the real agent process: update state and generation, then per-model counters
    and latency histogram moving with real requests (good and bad)."""
    labels = {"model": "digits", "version": "1.0.0", "variant": "cpu-fp32"}
    metrics_url = f"{device.agent.url}/metrics"
    before = scrape(metrics_url)
    assert before.value("edgefleet_agent_update_generation", model="digits") == 0  # no such model yet: no series
    assert before.value("edgefleet_agent_info", device=device.config.device_id,
                 agent_version=version("edgefleet")) == 1
    assert device.apply(repo.infos["v1"])["state"] == "SUCCEEDED"
    for _ in range(5):
        device.agent.infer()
    bad = httpx.post(f"{device.agent.url}/v2/models/digits/infer", timeout=10,
                     json={"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})
    assert bad.status_code == 400
    after = scrape(metrics_url)
    assert after.value("edgefleet_agent_update_generation", model="digits") == 1
    assert after.value("edgefleet_agent_update_state", model="digits", state="succeeded") == 1
    assert after.value("edgefleet_agent_update_state", model="digits", state="download") == 0
    assert after.value("edgefleet_agent_model_active", **labels) == 1
    assert after.value("edgefleet_agent_inference_requests_total", **labels) == 6
    assert after.value("edgefleet_agent_inference_errors_total", **labels, kind="rejected") == 1
    assert after.value("edgefleet_agent_inference_errors_total", **labels, kind="failed") == 0
    assert after.value("edgefleet_agent_inference_duration_seconds_count", **labels) == 5
    assert after.value("edgefleet_agent_inference_duration_seconds_bucket", **labels, le="+Inf") == 5
    assert after.value("edgefleet_agent_inference_duration_seconds_sum", **labels) > 0
    assert after.value("edgefleet_agent_samples_buffered", model="digits") == 0
    assert ("edgefleet_agent_model_memory_bytes", frozenset(labels.items())) in after.samples  # measured at load
    assert after.value("process_resident_memory_bytes") > 0


def test_daemon_serves_grpc_and_rest_with_batching_across_an_update(tmp_path, repo, mosquitto_url):
    """`serve_grpc` and `max_batch_size` in agent.toml: unmodified tritonclient over both front ends,
    before and after a hot-swap to a new version."""
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    grpc_address = f"127.0.0.1:{free_port()}"
    device = Device(tmp_path, repo, mosquitto_url, serve_grpc=grpc_address, max_batch_size=4).start()
    x = np.random.default_rng(5).random((3, 64), dtype=np.float32)
    try:
        for info in (repo.infos["v1"], repo.infos["v2"]):
            assert device.apply(info)["state"] == "SUCCEEDED"
            over_grpc = triton_grpc.InferenceServerClient(grpc_address)
            over_rest = triton_http.InferenceServerClient(device.agent.url.removeprefix("http://"))
            try:
                assert over_grpc.get_model_metadata("digits").versions == [info.version]
                g_in = triton_grpc.InferInput("input", [3, 64], "FP32")
                g_in.set_data_from_numpy(x)
                h_in = triton_http.InferInput("input", [3, 64], "FP32")
                h_in.set_data_from_numpy(x)
                by_grpc = over_grpc.infer("digits", [g_in]).as_numpy("probabilities")
                by_rest = over_rest.infer("digits", [h_in], model_version=info.version).as_numpy("probabilities")
                assert by_grpc.shape == (3, 10) and np.allclose(by_grpc, by_rest, atol=1e-6)
            finally:
                over_grpc.close()
                over_rest.close()
    finally:
        device.close()


def test_lifecycle_steps_are_logged_with_journald_priorities(tmp_path, repo, mosquitto_url):
    """Under systemd (stderr is the journal's stream: JOURNAL_STREAM names it) every line carries
    its syslog priority; each update step, the gate's verdict and the rollback are logged."""
    log = tmp_path / "agent.log"
    log.touch()
    stream = log.stat()
    device = Device(tmp_path, repo, mosquitto_url, env={"JOURNAL_STREAM": f"{stream.st_dev}:{stream.st_ino}"})
    device.start()
    try:
        assert device.apply(repo.infos["v1"])["state"] == "SUCCEEDED"
        assert device.apply(repo.infos["wrong"])["state"] == "ROLLED_BACK"
    finally:
        device.close()
    lines = log.read_text().splitlines()
    logged = [line for line in lines if line.startswith("<")]
    assert len(logged) == len(lines), [line for line in lines if not line.startswith("<")][:5]
    for step in ("download", "verify: downloaded", "stage: digits+1.0.0+cpu-fp32", "activate: digits+1.0.0",
                 "succeeded: swapped"):
        assert any(line.startswith("<6>edgefleet.agent.reconcile: update 1 (digits 1.0.0 cpu-fp32, rollout dep-1): "
                                   + step) for line in logged), step
    assert any(line.startswith("<6>edgefleet.agent.reconcile: activation gate of digits+1.0.0+cpu-fp32+r1 passed")
               for line in logged)
    assert any(line.startswith("<4>edgefleet.agent.reconcile: activation gate of digits+3.0.0-wrong+cpu-fp32+r3 "
                               "failed: golden set failed") for line in logged)
    assert any("update 2 (digits 3.0.0-wrong cpu-fp32, rollout dep-2): rolled_back: golden set failed" in line
               for line in logged)
