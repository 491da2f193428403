"""The data flywheel: inference counters per model segment, sampled confidence, the
simulator's production traffic, and the rollout gates and data export that read them.

The last test runs it all for real: a ``fleetctl controller run`` process on
Mosquitto, a simulated fleet serving requests through the real runtime, sampler
and upload, two rollouts with sampling on, then ``rollout status``,
``data export`` and ``data stats`` as an operator runs them.
"""
from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from edgefleet.agent.errors import ModelError
from edgefleet.agent.runtime import LoadedModel, ModelRuntime, RuntimeOptions
from edgefleet.agent.sampler import SampleMeta, Sampler, encode_sample
from edgefleet.common.protocol import ExecutionState as E
from edgefleet.common.protocol import (
    ModelCounters,
    ModelRef,
    SamplingPolicy,
    Telemetry,
    TelemetryKind,
)
from edgefleet.controller.dataset import decode_shard
from edgefleet.controller.db.models import GateResult, Sample
from edgefleet.controller.ingest import Ingest
from edgefleet.controller.rollout import engine
from edgefleet.simulator.faults import Faults, FaultySession
from edgefleet.simulator.runtime import SessionCache, SimRuntime
from edgefleet.simulator.traffic import (
    DeviceTraffic,
    InputSource,
    Traffic,
    TrafficConfig,
)
from tests.rollout_fleet import RecordingPublisher, fleet_db, spec_for
from tests.support.messages import counter_snapshot
from tests.support.units import units_serving

_seq = itertools.count(1)


def ref(version: str) -> ModelRef:
    return ModelRef(model="digits", version=version, variant="cpu-fp32", release=1)


def rows(digits, count: int) -> np.ndarray:
    return np.load(digits.eval_data)["input"][:count]


# --- the agent: counters per active model -------------------------------------------------


def test_counters_are_segmented_per_active_model(digits):
    runtime = ModelRuntime(RuntimeOptions())
    assert runtime.active_counters() is None
    old = runtime.load(digits.model, ref("1.0.0"))
    runtime.swap(old)
    for x in rows(digits, 3):
        runtime.infer({"input": x[None]})
    first = runtime.active_counters()
    assert first is not None
    assert first.model == ref("1.0.0") and first.requests == 3 and first.failures == 0

    # the new version fails half its requests; its segment starts from zero
    new = runtime.load(digits.model, ref("1.1.0"))
    failing = LoadedModel(FaultySession(new.session), new.path, new.ref, new.load_ms)
    runtime.swap(failing)
    for i, x in enumerate(rows(digits, 4)):
        failing.session.fail_fraction = float(i % 2)
        try:
            runtime.infer({"input": x[None]})
        except ModelError:
            pass
    second = runtime.active_counters()
    assert second is not None and second.model.version == "1.1.0"
    assert (second.requests, second.failures) == (4, 2), "not diluted by the old version's 3 good requests"
    assert second.since >= first.since and sum(second.latency_counts) == 2
    assert runtime.counters().requests == 7  # the runtime's own total still counts everything

    # the same version loaded again (a restart, a rollback and forward) is a new segment
    runtime.swap(runtime.load(digits.model, ref("1.1.0")))
    again = runtime.active_counters()
    assert again is not None and again.requests == 0 and again.since > second.since


# --- the controller: the gates read counters and sample confidence -----------------------------


def test_error_rate_and_confidence_gates_read_the_new_versions_data(tmp_path):
    db = fleet_db(f"sqlite:///{tmp_path / 'controller.db'}")
    publisher = RecordingPublisher()
    with db.unit_of_work() as session:
        rid = engine.create_rollout(session, spec_for(stages=(1.0,), max_error_rate=0.5), "test").rollout_id
    engine.step_all(db, publisher)
    sent = {d.device: d for d in publisher.sent}
    x86, rpi = "x1", "p1"
    for device, desired in sent.items():
        Ingest(db).apply([_event(device, desired.generation, rid)])

    def counters(device: str, boot: int, version: str, since: float, requests: int, failures: int) -> Telemetry:
        snapshot = counter_snapshot(requests, failures)
        return Telemetry(device=device, boot=boot, seq=next(_seq), kind=TelemetryKind.COUNTERS, ts=time.time(),
                         counters=ModelCounters.of(ref(version), since, snapshot))

    now = time.time()
    Ingest(db).apply([
        counters(x86, 1, "1.0.0", now - 500, 1000, 0),      # the old version: ignored
        counters(x86, 1, "1.1.0", now, 10, 1),               # a segment begun in the window counts whole
        counters(x86, 1, "1.1.0", now, 20, 2),
        counters(x86, 2, "1.1.0", now + 1, 5, 5),            # restarted: a new segment on boot 2
        counters(x86, 2, "1.1.0", now - 3600, 100, 0),       # begun before the rollout: only its growth
        counters(x86, 2, "1.1.0", now - 3600, 150, 10),
    ])
    def sample(device: str, cls: str, version: str, count: int, top1: float | None) -> Sample:
        return Sample(device_id=device, hardware_class=cls, model="digits", version=version, variant="cpu-fp32",
                      store_key=f"samples/{next(_seq)}.npz", count=count, bytes=1, top1_mean=top1)

    with db.unit_of_work() as session:
        session.add_all([
            sample(rpi, "rpi-4", "1.0.0", 40, 0.9),
            sample(rpi, "rpi-4", "1.1.0", 5, 0.5),
            sample(rpi, "rpi-4", "1.1.0", 15, 0.7),
            sample(rpi, "rpi-4", "1.1.0", 50, None),   # no confidence known: not counted
            sample(x86, "x86_64", "1.0.0", 40, 0.9),
            sample(x86, "x86_64", "1.1.0", 19, 0.1),   # too few rows to call it a shift
        ])
    engine.step_all(db, publisher)
    with db.unit_of_work() as session:
        gates: dict[tuple[str, str], tuple[object, str]] = {
            (g.gate, g.hardware_class): (g.value, g.verdict.value) for g in session.scalars(sa.select(GateResult))
        }
    assert gates[("error_rate", "x86_64")] == (pytest.approx(17 / 75), "PASS")    # (2+5+10) / (20+5+50)
    assert gates[("error_rate", "rpi-4")] == (None, "NO_DATA")
    assert gates[("confidence_shift", "rpi-4")] == (pytest.approx(0.9 - 0.65), "FAIL")  # mean of 0.5x5, 0.7x15
    assert gates[("confidence_shift", "x86_64")] == (None, "NO_DATA")


def _event(device: str, generation: int, rid: str):
    from edgefleet.common.protocol import Event

    return Event(device=device, boot=1, seq=next(_seq), generation=generation, state=E.SUCCEEDED,
                 deployment=rid)


def test_shard_top1_from_outputs_else_the_agents_metadata():
    inputs = {"input": np.zeros((1, 4), np.float32)}
    meta = SampleMeta("digits", "1.0.0", "cpu-fp32", "d1", 0.0, "low_confidence", top1=0.4, margin=0.1)
    # raw scores sort before the probabilities: the controller reads predictions from the scores, and
    # the confidence from the agent's figure
    outputs = {"logits": np.array([[2.0, 1.5, 1.5]], np.float32), "probs": np.array([[0.4, 0.3, 0.3]], np.float32)}
    shard = decode_shard(encode_sample(inputs, outputs, meta))
    assert shard.predicted.tolist() == [0]
    assert shard.top1.tolist() == [0.4] and shard.low.tolist() == [True]
    per_row = decode_shard(encode_sample(inputs, {"p": np.array([[0.2, 0.8]], np.float32)}, meta))
    assert per_row.top1.tolist() == [pytest.approx(0.8)]
    unknown = SampleMeta("digits", "1.0.0", "cpu-fp32", "d1", 0.0, "rate", top1=None, margin=None)
    assert decode_shard(encode_sample(inputs, {"label": np.array([3])}, unknown)).top1 is None


# --- the simulator: production traffic on one device, without a network ----------------------------


def test_device_traffic_serves_samples_uploads_and_shows_faults(digits, tmp_path):
    faults = Faults()
    runtime = SimRuntime(SessionCache(RuntimeOptions()), lambda: faults)
    runtime.swap(runtime.load(digits.model, ref("1.0.0")))
    sampler = Sampler(SamplingPolicy(enabled=True, rate=1.0, max_per_hour=1000), tmp_path / "samples", device="d1")
    uploaded: list[dict] = []
    traffic = Traffic(TrafficConfig(requests_per_s=5, upload_interval_s=2, inputs=digits.eval_data, threads=1))
    units = units_serving(tmp_path / "state", "digits", runtime, sampler)
    device = DeviceTraffic(traffic, "d1", units, lambda data, meta: uploaded.append(meta))
    try:
        def active_counters() -> ModelCounters:
            counters = runtime.active_counters()
            assert counters is not None
            return counters

        def tick_and_drain(times: int = 1) -> None:
            for _ in range(times):
                device.tick(1.0)
                traffic.pool.submit(lambda: None).result(10)  # one thread: everything before it has run

        tick_and_drain()
        assert active_counters().requests == 5 and len(sampler.pending()) == 5
        assert not uploaded, "uploads wait for their interval"
        tick_and_drain()
        assert len(uploaded) == 5 + 5 and not sampler.pending()
        assert {(m["model"], m["version"], m["device"]) for m in uploaded} == {("digits", "1.0.0", "d1")}
        assert all(0 < m["top1"] <= 1 for m in uploaded)
        fast = active_counters().latency_counts

        # the next version is slow and fails 60% of production requests, yet passes a check before activation
        faults.extra_latency_ms, faults.fail_infer, faults.versions = 30.0, 0.6, frozenset({"1.1.0"})
        slow = runtime.load(digits.model, ref("1.1.0"))
        assert slow.run({"input": rows(digits, 1)})["probabilities"].shape == (1, 10)  # the golden-check path
        runtime.swap(slow)
        tick_and_drain(4)
        counters = active_counters()
        assert counters.model.version == "1.1.0" and counters.requests == 20
        assert 3 <= counters.failures <= 19  # 60% of 20, and not all or none
        slowest = counters.latency_counts
        buckets = counters.latency_buckets_ms
        assert sum(c for b, c in zip(buckets, slowest, strict=False) if b >= 20) == sum(slowest) > 0
        assert sum(c for b, c in zip(buckets, fast, strict=False) if b >= 20) == 0
        assert traffic.snapshot().to_dict() == {"requests": 30, "failures": counters.failures, "shed": 0,
                                                "samples_uploaded": len(uploaded)}
    finally:
        traffic.close()


def test_generated_inputs_fit_the_model(digits):
    runtime = ModelRuntime()
    loaded = runtime.load(digits.model, ref("1.0.0"))
    import random

    source = InputSource.generated(loaded.inputs, random.Random(1))
    assert InputSource.fits(source.arrays, loaded.inputs)
    assert loaded.run(source.take())["probabilities"].shape == (1, 10)
    assert not InputSource.fits({"input": np.zeros((3, 10), np.float32)}, loaded.inputs)


# --- end to end: controller process, Mosquitto, a simulated fleet with traffic ---------------------------


class Fleetctl:
    """The operator's ``fleetctl`` in this process (the controller is a real process; this saves
    a Python start per command)."""

    def __init__(self, home: Path) -> None:
        self.env = {"EDGEFLEET_HOME": str(home)}

    def __call__(self, *args: str) -> str:
        from click.testing import CliRunner

        from edgefleet.controller.cli import main

        result = CliRunner().invoke(main, list(args), env=self.env)
        assert result.exit_code == 0, f"fleetctl {' '.join(args)}: {result.output}"
        return result.stdout

    def json(self, *args: str):
        return json.loads(self(*args, "--format", "json"))


CLASSES = ("x86_64", "rpi-4")
TERMINAL = {"SUCCEEDED", "FAILED", "ROLLED_BACK", "ABORTED", "SUPERSEDED"}
# This test is about the error-rate and confidence gates: the p99 gate, exercised elsewhere, is
# opened wide so that a busy CI machine cannot fail the rollout on latency first.
ROLLOUT = ["--stages", "100%", "--min-devices-per-stage", "1", "--device-timeout", "2m",
           "--sample-rate", "100%", "--sample-low-confidence", "0.9", "--max-p99-regression", "1000%"]


def test_production_data_reaches_the_gates_and_the_dataset(tmp_path, mosquitto_url, digits):
    """1.0.0 then 1.1.0 roll out with sampling on: every gate of 1.1.0 has a value. 1.2.0 passes
    its golden set but fails 60% of production requests on rpi-4: the error-rate gate stops it.
    The samples of all of it come back as a dataset and as statistics."""
    from demo.scenario import Controller, wait_for, write_config
    from edgefleet.controller.cli.client import ApiClient, read_token
    from edgefleet.simulator import Fleet, FleetConfig
    from tests.conftest import free_port

    home, api_port, run = tmp_path / "home", free_port(), uuid.uuid4().hex[:6]
    write_config(home, api_port, broker_url=mosquitto_url, embedded_broker_port=free_port())
    with open(home / "config.toml", "a") as config:  # a controller left on the shared broker must not take our share
        config.write(f'share_group = "flywheel-{run}"\n')
    fleetctl = Fleetctl(home)
    fleetctl("init")
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        bundle = tmp_path / f"digits-{version}"
        fleetctl("bundle", "build", str(digits.model), "--name", "digits", "--version", version,
                 "--variant", "cpu-fp32", "--eval", str(digits.eval_data), "-o", str(bundle))
        fleetctl("bundle", "publish", str(bundle))
    controller = Controller(home, f"http://127.0.0.1:{api_port}").start()
    token = read_token(home)
    client = ApiClient(controller.url, token)
    try:
        prefix = f"fw{run}"  # device ids unique on the shared broker (retained topics)
        fleet = Fleet(FleetConfig(
            controller_url=controller.url, operator_token=token, devices=4, classes=CLASSES, prefix=prefix,
            state_root=tmp_path / "fleet", workers=2, heartbeat_s=0.5, reconnect_min_s=0.1, reconnect_max_s=0.5,
            traffic=TrafficConfig(requests_per_s=4, upload_interval_s=0.5, inputs=digits.eval_data),
        ))
        try:
            fleet.create()
            classes = {d.id: d.profile.hardware_class for d in fleet.devices.values()}
            for device in fleet.devices.values():
                if device.profile.hardware_class == "rpi-4":
                    fleet.inject(device.id, Faults(fail_infer=0.6, versions=frozenset({"1.2.0"})))
            fleet.start()
            wait_for(lambda: [d["online"] for d in client.get("/v1/devices", selector=f"fleet={prefix}")] == [True] * 4,
                     60, "the fleet online")

            def rollout(version: str, name: str, bake: str) -> dict:
                fleetctl("deploy", f"digits:{version}", "--to", f"fleet={prefix}", "--name", name, "--bake", bake,
                         *ROLLOUT)
                wait_for(lambda: client.get(f"/v1/rollouts/{name}")["state"] in TERMINAL, 90, f"rollout {name}",
                         controller.log)
                status = fleetctl.json("rollout", "status", name)
                return {**status, "by_gate": {(g["gate"], g["hardware_class"]): g for g in status["gates"]}}

            assert rollout("1.0.0", "r1", "1s")["state"] == "SUCCEEDED"
            wait_for(lambda: {s["hardware_class"] for s in client.get("/v1/data/samples", model="digits")} == set(CLASSES),
                     30, "samples of 1.0.0 from both classes")

            # the bake gives the new version's counters and samples time to arrive before the verdict
            good = rollout("1.1.0", "r2", "5s")
            assert good["state"] == "SUCCEEDED", good["detail"]
            for cls in CLASSES:
                error_rate, shift = good["by_gate"][("error_rate", cls)], good["by_gate"][("confidence_shift", cls)]
                assert (error_rate["value"], error_rate["verdict"]) == (0, "PASS"), good["gates"]
                assert shift["value"] is not None and shift["verdict"] == "PASS", good["gates"]

            bad = rollout("1.2.0", "r3", "5s")
            assert bad["state"] in ("FAILED", "ROLLED_BACK") and "error_rate on rpi-4" in bad["detail"], bad["detail"]
            failing = bad["by_gate"][("error_rate", "rpi-4")]
            assert failing["verdict"] == "FAIL" and failing["value"] > 0.2, bad["gates"]
            wait_for(lambda: all(fleet.device(d).active("digits").ref.version == "1.1.0" for d in fleet.devices), 30,
                     "every device back on 1.1.0")
        finally:
            fleet.stop(clear_retained=True)
            fleet.close()

        samples = client.get("/v1/data/samples", model="digits", limit=5000)
        assert all(s["top1_mean"] is not None and 0 < s["top1_mean"] <= 1 for s in samples)
        assert sum(s["low_confidence"] for s in samples) > 0, "the digits eval set has a few unsure rows"
        groups = Counter((s["version"], s["hardware_class"]) for s in samples)
        assert set(groups) >= {(v, c) for v in ("1.0.0", "1.1.0") for c in CLASSES}, groups

        out = tmp_path / "dataset"
        printed = fleetctl("data", "export", "--model", "digits", "-o", str(out))
        index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        assert len(index) == sum(s["count"] for s in samples) and f"wrote {len(index)} row(s)" in printed
        for entry in index:
            assert entry["model"] == "digits" and entry["variant"] == "cpu-fp32"
            assert entry["version"] in ("1.0.0", "1.1.0", "1.2.0") and entry["hardware_class"] == classes[entry["device"]]
            assert 0 < entry["top1"] <= 1 and 0 <= entry["predicted"] <= 9
        shard_rows = 0
        for shard in sorted(out.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as arrays:
                assert arrays["input/input"].shape[1:] == (64,) and arrays["output/probabilities"].shape[1:] == (10,)
                shard_rows += len(arrays["input/input"])
        assert shard_rows == len(index)

        stats = {(g["version"], g["hardware_class"]): g for g in fleetctl.json("data", "stats", "--model", "digits")["groups"]}
        assert set(stats) == set(groups)
        for key, group in stats.items():
            assert group["samples"] == sum(s["count"] for s in samples if (s["version"], s["hardware_class"]) == key)
            assert sum(group["confidence_histogram"]) == group["samples"] and group["class_histogram"]
        table = fleetctl("data", "stats", "--model", "digits")
        assert "1.1.0" in table and "confidence bins" in table
    finally:
        client.close()
        controller.stop()


def test_simulator_cli_traffic_flags_and_fail_infer_fault(digits):
    from edgefleet.simulator.cli import apply_fault, config_from, parse_fault, parser

    args = parser().parse_args(["--broker", "mqtt://127.0.0.1:1883", "--requests-per-s", "3", "--upload-interval", "2",
                                "--inputs", str(digits.eval_data), "--traffic-threads", "3"])
    assert config_from(args).traffic == TrafficConfig(requests_per_s=3, upload_interval_s=2, inputs=digits.eval_data,
                                                      threads=3)
    assert config_from(parser().parse_args([])).traffic.requests_per_s == 2, "traffic is on by default"
    assert not config_from(parser().parse_args(["--requests-per-s", "0"])).traffic.enabled
    with pytest.raises(SystemExit):
        parser().parse_args(["--requests-per-s", "-1"])

    target, kind, value, version = parse_fault("rpi-4:fail-infer=0.3@1.2.0")
    faults = Faults()
    apply_fault(faults, kind, value, version)
    assert (target, faults.fail_infer, faults.versions) == ("rpi-4", 0.3, frozenset({"1.2.0"}))
    assert faults.model_faulty(ref("1.2.0")) and not faults.model_faulty(ref("1.1.0"))
    for bad in ("rpi-4:fail-infer", "rpi-4:fail-infer=1.5"):
        with pytest.raises(Exception, match="fail-infer"):
            parse_fault(bad)
