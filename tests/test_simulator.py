"""The fleet simulator: real agent code for many devices on one network thread, against
Mosquitto and a real signed repository served over HTTP."""
from __future__ import annotations

import json
import threading
import uuid
from collections import defaultdict
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.common.protocol import Channel, topic
from edgefleet.simulator import Faults, Fleet, FleetConfig, profile_for
from edgefleet.simulator.cli import apply_fault, parse_fault
from edgefleet.simulator.faults import FaultySession
from tests.support.fleet import ModelRepo, desired
from tests.support.mqtt import wait_until

DEVICES = 20
WORKERS = 4


@pytest.fixture(scope="module")
def repo(tmp_path_factory, digits):
    eval_inputs = np.load(digits.eval_data)["input"]
    signed = ModelRepo.create(tmp_path_factory.mktemp("sim-repo"), eval_inputs, digits.model)
    signed.infos["v1"] = signed.publish(digits.model, "1.0.0")
    yield signed
    signed.stop()


class Watcher:
    """Everything the fleet sends, seen from the broker (a plain paho subscriber)."""

    def __init__(self, broker_url: str, prefix: str, repo: ModelRepo) -> None:
        host, _, port = broker_url.removeprefix("mqtt://").partition(":")
        self.prefix = prefix
        self.repo = repo
        self.messages: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe("edgefleet/v1/+/+", qos=1)
            ready.set()

        self.client.on_connect = on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c, _u, message) -> None:
        _, _, device, channel = message.topic.split("/")
        if device.startswith(self.prefix) and message.payload and channel != "desired":
            with self._lock:
                self.messages[device].append((channel, json.loads(message.payload)))

    def of(self, device: str, channel: str) -> list[dict]:
        with self._lock:
            return [body for ch, body in self.messages[device] if ch == channel]

    def publish_desired(self, message) -> None:
        self.client.publish(topic(message.device, Channel.DESIRED), self.repo.seal(message), qos=1, retain=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_fleet_updates_with_faults_on_one_network_thread(repo, mosquitto_url, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    threads_before = threading.active_count()
    fleet = Fleet(FleetConfig(
        broker_url=mosquitto_url, devices=DEVICES, classes=("x86_64", "rpi-4"), prefix=prefix,
        state_root=tmp_path / "fleet", workers=WORKERS, trusted_root=repo.trusted_root(),
        metadata_url=repo.metadata_url, target_base_url=repo.target_base_url, heartbeat_s=2.0,
        download_timeout_s=5.0, reconnect_min_s=0.1, reconnect_max_s=0.5, session_expiry_s=60,
    ))
    watcher = Watcher(mosquitto_url, prefix, repo)
    try:
        fleet.create()
        ids = sorted(fleet.devices)
        golden_bad, cut_activate, cut_download, slow_link = ids[0], ids[1], ids[2], ids[3]
        fleet.inject(golden_bad, Faults(fail_golden=True, versions=frozenset({"1.0.0"})))
        fleet.inject(cut_activate, Faults(power_cut_at="activate"))
        fleet.inject(cut_download, Faults(power_cut_after_bytes=5000))
        fleet.inject(slow_link, Faults(download_bps=200_000))
        fleet.start()
        assert wait_until(lambda: fleet.stats().connected == DEVICES, 30), fleet.stats()

        for device in ids:
            watcher.publish_desired(desired(device, 1, repo.infos["v1"]))
        terminal = {"SUCCEEDED", "ROLLED_BACK", "FAILED", "REJECTED"}

        def settled() -> bool:
            return all(d.last_event is not None and d.last_event.state in terminal and d.running
                       for d in fleet.devices.values())

        assert wait_until(settled, 90), fleet.stats()
        states = {d: fleet.device(d).last_event.state for d in ids}
        assert states.pop(golden_bad) == "ROLLED_BACK"
        assert set(states.values()) == {"SUCCEEDED"}, states
        for device in (cut_activate, cut_download):
            assert fleet.device(device).power_cuts == 1 and fleet.device(device).boot == 2
        assert fleet.device(ids[5]).active("digits").ref.version == "1.0.0"

        stats = fleet.stats()
        assert stats.sessions == 1  # twenty devices, one ONNX Runtime session
        # one network thread and the worker pool, not a thread per device (the rest here are the
        # watcher's paho thread and the repository server's keep-alive handlers)
        names = [t.name for t in threading.enumerate()]
        assert sorted(n for n in names if n.startswith("sim-")) == ["sim-network"] + [f"sim-worker-{i}" for i in range(WORKERS)]
        assert not [n for n in names if prefix in n]
        assert stats.threads - threads_before <= 2 * WORKERS + 2 < DEVICES, names

        # the broker saw the wire contract: stamped events in seq order, wills of the cut devices
        wait_until(lambda: all(any(e["state"] == "SUCCEEDED" for e in watcher.of(d, "events"))
                               for d in ids if d != golden_bad), 10)
        for device in ids:
            events = watcher.of(device, "events")
            assert events and all(e["device"] == device and e["ts"] > 0 for e in events)
            by_boot = defaultdict(list)
            for e in events:
                by_boot[e["boot"]].append(e["seq"])
            assert all(seqs == sorted(seqs) for seqs in by_boot.values())
        assert any(e["state"] == "SUCCEEDED" for e in watcher.of(cut_activate, "events"))
        assert {"online": False, "boot": 1} in [{k: s[k] for k in ("online", "boot")}
                                                for s in watcher.of(cut_activate, "status")]
        for device in (ids[4], ids[-1]):  # one of each class
            reported = watcher.of(device, "reported")[-1]
            assert [m["active"]["version"] for m in reported["models"]] == ["1.0.0"]
            assert device.startswith(f"{prefix}-{reported['hardware']['hardware_class']}-")
    finally:
        fleet.stop(clear_retained=True)
        for device in fleet.devices:
            watcher.client.publish(topic(device, Channel.DESIRED), b"", qos=1, retain=True)
        watcher.close()


def test_fault_spec_parsing_and_faulty_session():
    target, kind, value, version = parse_fault("rpi-4:slow-model=40@1.1.0")
    faults = Faults()
    apply_fault(faults, kind, value, version)
    assert (target, faults.extra_latency_ms, faults.versions) == ("rpi-4", 40.0, frozenset({"1.1.0"}))
    with pytest.raises(Exception, match="TARGET:KIND"):
        parse_fault("rpi-4:melt")

    class Session:
        def run(self, names, feed):
            return [np.array([[0.9, 0.1, 0.0]], np.float32)]

    wrong = FaultySession(Session(), wrong=True)
    assert wrong.run(None, {})[0].argmax() != Session().run(None, {})[0].argmax()


def test_hardware_classes_match_the_agents_classification():
    assert profile_for("rpi-4").hardware_class == "rpi-4"
    assert profile_for("jetson-orin-nano").hardware_class == "jetson-orin-nano"
    with pytest.raises(ValueError, match="unknown hardware class"):
        profile_for("toaster")
