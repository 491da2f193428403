"""A real signed repository served over HTTP, an MQTT observer, and agent configs,
for tests that drive the agent (in-process reconciler or a `fleet-agent run` process)."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fetch import trust_root
from edgefleet.common.golden import GoldenSet
from edgefleet.common.protocol import (
    Channel,
    Desired,
    DesiredSet,
    Gate,
    TargetInfo,
    target_path,
    topic,
)
from edgefleet.controller.director import DirectorSigner

from .repo_server import RepoServer
from .signed_repo import CPU_REQUIREMENTS, SignedRepo

GOLDEN_SAMPLES = 8
# short, and tolerant of a busy shared CI machine; the slow model is ~50x slower
FAST_GATE = Gate(bench_seconds=0.2, bench_min_queries=20, max_p99_regression=3.0)


def make_golden(reference: Path, inputs: np.ndarray, out: Path) -> Path:
    """A golden set whose expected outputs are the reference model's own."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = inputs[:GOLDEN_SAMPLES].astype(np.float32)
    outputs = {"probabilities": session.run(["probabilities"], {name: batch})[0]}
    return GoldenSet({name: batch}, outputs, atol=1e-4, rtol=1e-3, top1=True).save(out)


@dataclass
class ModelRepo:
    """A signed repository (tests/support/signed_repo.py) that publishes real, loadable models."""

    signed: SignedRepo
    eval_inputs: np.ndarray
    reference: Path          # golden outputs come from this model (digits) unless told otherwise
    infos: dict[str, TargetInfo] = field(default_factory=dict)  # what a test module published, by its own names
    _director: DirectorSigner | None = None

    @classmethod
    def create(cls, root: Path, eval_inputs: np.ndarray, reference: Path) -> ModelRepo:
        return cls(SignedRepo.create(root), eval_inputs, reference)

    @property
    def server(self) -> RepoServer:
        return self.signed.server

    @property
    def metadata_url(self) -> str:
        return self.signed.metadata_url

    @property
    def target_base_url(self) -> str:
        return self.signed.target_base_url

    def trusted_root(self) -> bytes:
        return self.signed.repository.trusted_root()

    def seal(self, message: Desired | DesiredSet) -> bytes:
        """``message`` signed by the fleet's director key, as the controller publishes it (an entry
        alone goes as the set of that one model, at its generation)."""
        if self._director is None:
            self._director = DirectorSigner(self.signed.repository)
        return self._director.seal(as_set(message) if isinstance(message, Desired) else message)

    def publish(
        self,
        model_file: Path,
        version: str,
        model: str = "digits",
        variant: str = "cpu-fp32",
        requirements: dict | None = None,
        golden_from: Path | None = None,
    ) -> TargetInfo:
        """Build a one-variant bundle (what `fleetctl bundle build` writes) and sign it."""
        out = self.signed.root / "bundles" / f"{model}-{version}"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{variant}.onnx").write_bytes(Path(model_file).read_bytes())
        make_golden(golden_from or self.reference, self.eval_inputs, out / f"{variant}.golden.npz")
        report = {
            "model": model, "version": version, "created": "2026-01-01T00:00:00Z", "reference": {},
            "variants": [{
                "variant": variant, "file": f"{variant}.onnx", "golden": f"{variant}.golden.npz",
                "requirements": requirements or CPU_REQUIREMENTS, "preference": 0,
            }],
            "refused": [],
        }
        (out / "report.json").write_text(json.dumps(report))
        (info,) = self.signed.repository.publish(out)
        return info

    def stop(self) -> None:
        self.signed.server.stop()


def agent_config(state_dir: Path, repo: ModelRepo, broker_url: str, serve: str, **overrides: Any) -> AgentConfig:
    """An enrolled agent's config (as `fleet-agent enroll` would write) with the repository's root trusted."""
    settings: dict[str, Any] = {
        "device_id": f"dev-{uuid.uuid4().hex[:10]}", "state_dir": state_dir, "broker_url": broker_url,
        "serve": serve, "metadata_url": repo.metadata_url, "target_base_url": repo.target_base_url,
        "heartbeat_s": 5.0, "download_timeout_s": 2.0, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0,
    }
    config = AgentConfig(**{**settings, **overrides})
    trust_root(state_dir / "tuf", repo.trusted_root())
    return config


def as_set(entry: Desired) -> DesiredSet:
    """The desired set of one model's entry, at the entry's generation."""
    return DesiredSet(device=entry.device, generation=entry.generation, models=(entry,))


def desired(device: str, generation: int, info: TargetInfo | None = None, **fields: Any) -> Desired:
    """One model's entry (digits unless ``info`` or ``model`` names another)."""
    if info is not None:
        fields = {"model": info.model, "version": info.version, "variant": info.variant,
                  "target": target_path(info.model, info.version, info.variant), **fields}
    return Desired(device=device, generation=generation, deployment=f"dep-{generation}",
                   gate=fields.pop("gate", FAST_GATE), **{"model": "digits", **fields})


class Observer:
    """Publishes retained desired states (sealed by ``seal``) and collects what one device sends
    (paho, a real broker)."""

    def __init__(self, broker_url: str, device: str, seal: Callable[[Desired | DesiredSet], bytes]) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        host, _, port = broker_url.removeprefix("mqtt://").partition(":")
        self.device = device
        self.seal = seal
        self.messages: queue.Queue[tuple[Channel, dict]] = queue.Queue()
        self.seen: list[tuple[Channel, dict]] = []
        self.reported: dict | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{uuid.uuid4().hex[:8]}")
        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe(f"edgefleet/v1/{device}/#", qos=1)
            self._ready.set()

        self.client.on_connect = on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self._ready.wait(10), "observer could not connect to the broker"

    def _on_message(self, _client, _userdata, message) -> None:
        channel = Channel(message.topic.rsplit("/", 1)[1])
        if channel is Channel.DESIRED or not message.payload:
            return
        body = json.loads(message.payload)
        with self._lock:
            self.seen.append((channel, body))
            if channel is Channel.REPORTED:
                self.reported = body

    def publish(self, message: Desired | DesiredSet) -> None:
        self.publish_raw(self.seal(message))

    def publish_raw(self, payload: bytes, device: str | None = None) -> None:
        """Any bytes, retained on the desired topic of ``device`` (this one by default), as an attacker could."""
        info = self.client.publish(topic(device or self.device, Channel.DESIRED), payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def model_report(self, model: str = "digits") -> dict | None:
        """The model's entry of the device's last report."""
        return next((m for m in (self.reported or {}).get("models", []) if m["model"] == model), None)

    def events(self, generation: int | None = None) -> list[dict]:
        with self._lock:
            return [b for c, b in self.seen
                    if c is Channel.EVENTS and (generation is None or b["generation"] == generation)]

    def states(self, generation: int) -> list[str]:
        return [e["state"] for e in self.events(generation)]

    def telemetry(self, kind: str) -> list[dict]:
        with self._lock:
            return [b for c, b in self.seen if c is Channel.TELEMETRY and b["kind"] == kind]

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; events: {self.events()[-8:]}")

    def wait_terminal(self, generation: int, timeout: float = 60.0) -> dict:
        terminal = {"SUCCEEDED", "FAILED", "ROLLED_BACK", "REJECTED"}
        return self.wait(
            lambda: next((e for e in self.events(generation) if e["state"] in terminal), None),
            timeout, f"generation {generation} to finish",
        )

    def close(self) -> None:
        self.client.publish(topic(self.device, Channel.DESIRED), b"", qos=1, retain=True).wait_for_publish(5)
        self.client.loop_stop()
        self.client.disconnect()


class AgentProcess:
    """`fleet-agent run` as a real process, and an OIP client for its inference server."""

    def __init__(self, config: AgentConfig, workdir: Path, preexec: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.config_path = workdir / "agent.toml"
        self.config_path.write_text(config.to_toml())
        self.log_path = workdir / "agent.log"
        self.url = f"http://{config.serve}"
        self._preexec = preexec
        self._env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "fleet-agent"), "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._preexec,
                env={**os.environ, **(self._env or {})},
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_live(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"agent exited with {self.proc.returncode}:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/live", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"agent did not start serving in {timeout}s:\n{self.log()}")

    def infer(self, model: str = "digits", timeout: float = 10.0) -> dict:
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": [0.5] * 64}]}).encode()
        request = urllib.request.Request(f"{self.url}/v2/models/{model}/infer", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def serving_version(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/models/digits", timeout=5) as response:
                return json.loads(response.read())["versions"][0]
        except urllib.error.HTTPError:
            return None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agent did not stop on SIGTERM in {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class Load:
    """A steady stream of inference requests in a thread; counts answers and failures."""

    def __init__(self, agent: AgentProcess, clients: int = 2) -> None:
        self.agent = agent
        self.ok = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.agent.infer()
                with self._lock:
                    self.ok += 1
                    self.versions.add(answer["model_version"])
            except Exception as e:  # noqa: BLE001 - every failure counts
                with self._lock:
                    self.failures.append(f"{type(e).__name__}: {e}")

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
