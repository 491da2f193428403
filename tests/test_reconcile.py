"""The reconcile pass in-process: real TUF repository over HTTP, real slots, real ONNX Runtime.

Only the MQTT link is a recorder here; tests/test_agent_process.py drives the
same paths through a real `fleet-agent run` process and a real broker.
"""
import errno
import json
import platform
from datetime import datetime, timedelta

import numpy as np
import pytest

from edgefleet.agent.fetch import ModelUpdater
from edgefleet.agent.reconcile import WINDOW_RECHECK_S, HandlerResult, Reconciler
from edgefleet.agent.runtime import ModelRuntime
from edgefleet.agent.slots import Slots, slot_name
from edgefleet.agent.state import LOOP_LIMIT, Outcome, State, TransitionError
from edgefleet.common.hardware import HardwareProfile, normalize_arch
from edgefleet.common.protocol import Action, BenchmarkReport, ModelRef, Window
from edgefleet.common.retry import Backoff
from tests.support.fleet import ModelRepo, agent_config, desired
from tests.support.repo_server import Faults

ARCH = normalize_arch(platform.machine())


class RecordingLink:
    def __init__(self):
        self.events, self.reports, self.sent = [], [], []

    def event(self, state, **fields):
        self.events.append({"state": state, **fields})

    def report(self, generation, **fields):
        self.reports.append({"generation": generation, **fields})

    def telemetry(self, payload):
        self.sent.append(payload)

    def states(self, generation):
        return [e["state"] for e in self.events if e["generation"] == generation]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, digits, wrong_model, slow_model, broken_model):
    eval_inputs = np.load(digits.eval_data)["input"]
    signed = ModelRepo.create(tmp_path_factory.mktemp("fleet"), eval_inputs, digits.model)
    signed.infos = {
        "v1": signed.publish(digits.model, "1.0.0"),
        "v2": signed.publish(digits.model, "2.0.0"),
        "wrong": signed.publish(wrong_model, "3.0.0-wrong"),
        "slow": signed.publish(slow_model, "4.0.0-slow"),
        "broken": signed.publish(broken_model, "5.0.0-broken"),
        "arm": signed.publish(digits.model, "6.0.0", variant="arm-int8",
                              requirements={"arch": ["riscv64"], "providers": ["CPUExecutionProvider"]}),
        "v7": signed.publish(digits.model, "7.0.0"),
    }
    yield signed
    signed.stop()


class Agent:
    """One in-process device: slots, updater, runtime, reconciler."""

    def __init__(self, tmp_path, repo, writer=None):
        self.config = agent_config(tmp_path / "state", repo, "mqtt://unused:1", "127.0.0.1:0", download_timeout_s=0.5)
        self.slots = Slots(self.config.state_dir, writer=writer)
        self.runtime = ModelRuntime()
        self.link = RecordingLink()
        updater = ModelUpdater(self.config.state_dir / "tuf", repo.metadata_url, repo.target_base_url, 0.5)
        profile = HardwareProfile(arch=ARCH, memory_mb=2048)
        self.reconciler = Reconciler(self.slots, updater, self.runtime, self.link, profile,
                                     backoff=Backoff(min_s=0.01, max_s=0.02))
        self.device = self.config.device_id
        self.generation = 0

    def apply(self, info=None, **fields):
        self.generation += 1
        d = desired(self.device, self.generation, info, **fields)
        return self.reconciler.run_pass(d), d

    def serving(self):
        return self.runtime.active.ref

    def serve_active(self) -> None:
        """As the daemon does at start."""
        active = self.slots.active()
        assert active is not None
        self.runtime.swap(self.runtime.load(active.model, active.meta.ref))

    def close(self):
        self.runtime.close()


@pytest.fixture
def agent(tmp_path, repo):
    a = Agent(tmp_path, repo)
    yield a
    a.close()


def ref(info):
    return ModelRef(info.model, info.version, info.variant, info.release)


def test_update_walks_every_state_and_is_idempotent(agent, repo):
    v1 = repo.infos["v1"]
    delay, d = agent.apply(v1)
    assert delay is None
    assert agent.link.states(1) == ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "SUCCEEDED"]
    assert agent.serving() == ref(v1)
    assert agent.slots.active().meta.ref == ref(v1) and agent.slots.active().meta.p99_ms > 0
    assert agent.link.reports[-1]["active"] == ref(v1) and agent.link.reports[-1]["generation"] == 1
    assert agent.link.reports[-1]["memory_kb"] >= 0  # what the session took, for the report's model entry
    bench = agent.link.sent[-1]
    assert isinstance(bench, BenchmarkReport) and bench.model == ref(v1)
    golden, benchmark = bench.gate.golden, bench.gate.benchmark
    assert golden is not None and golden.passed and benchmark is not None and benchmark.p99_ms > 0
    # level-triggered: the same desired state again changes nothing and reports nothing new
    events = len(agent.link.events)
    assert agent.reconciler.run_pass(d) is None
    assert len(agent.link.events) == events
    # v2: previous is v1, staging and stale slots are gone
    agent.apply(repo.infos["v2"])
    assert agent.link.states(2)[-1] == "SUCCEEDED"
    assert agent.serving() == ref(repo.infos["v2"])
    assert agent.slots.previous().meta.ref == ref(v1)
    assert list(agent.slots.staging_root.glob("*")) == []
    # a new generation naming what already runs succeeds at once
    agent.apply(repo.infos["v2"])
    assert agent.link.states(3) == ["SUCCEEDED"]


def test_golden_set_failure_rolls_back_and_keeps_serving(agent, repo):
    agent.apply(repo.infos["v1"])
    agent.apply(repo.infos["wrong"])
    last = agent.link.events[-1]
    assert last["state"] == "ROLLED_BACK" and "golden set failed" in last["detail"]
    assert agent.serving() == ref(repo.infos["v1"])
    assert agent.slots.get(slot_name(ref(repo.infos["wrong"]))) is None
    # a failed generation is not retried by the next pass
    events = len(agent.link.events)
    agent.reconciler.run_pass(desired(agent.device, agent.generation, repo.infos["wrong"]))
    assert len(agent.link.events) == events


def test_slow_model_rolls_back_on_the_benchmark_gate(agent, repo):
    agent.apply(repo.infos["v1"])
    agent.apply(repo.infos["slow"])
    last = agent.link.events[-1]
    assert last["state"] == "ROLLED_BACK" and "regresses past" in last["detail"], last
    assert last["gate"].benchmark.p99_ms > last["gate"].p99_limit_ms >= last["gate"].previous_p99_ms
    assert agent.serving() == ref(repo.infos["v1"])


def test_model_that_does_not_load_rolls_back(agent, repo):
    agent.apply(repo.infos["v1"])
    agent.apply(repo.infos["broken"])
    last = agent.link.events[-1]
    assert last["state"] == "ROLLED_BACK" and "cannot load model" in last["detail"]
    assert agent.serving() == ref(repo.infos["v1"])


def test_unsigned_target_fails(agent, repo):
    agent.apply(model="digits", version="9.9.9", variant="cpu-fp32", target="digits/9.9.9/cpu-fp32.onnx")
    last = agent.link.events[-1]
    assert last["state"] == "FAILED" and "not signed" in last["detail"]
    assert agent.runtime.active is None


def test_target_for_other_hardware_is_rejected(agent, repo):
    agent.apply(repo.infos["arm"])
    last = agent.link.events[-1]
    assert last["state"] == "REJECTED" and "riscv64" in last["detail"]
    assert list(agent.slots.staging_root.glob("*")) == []


def test_lower_release_is_refused(agent, repo):
    agent.apply(repo.infos["v2"])
    agent.apply(repo.infos["v1"])
    last = agent.link.events[-1]
    assert last["state"] == "FAILED" and "refusing to roll back" in last["detail"]
    assert agent.serving() == ref(repo.infos["v2"])


CUT = 200_000  # beyond fetch's 64 KiB read size, so whole chunks arrive before the fault


@pytest.mark.parametrize("fault", [Faults(match=".onnx", status=404), Faults(match=".onnx", stall_after=CUT),
                                   Faults(match=".onnx", cut_after=CUT)], ids=["404", "stall", "truncated"])
def test_transport_trouble_stays_downloading_and_resumes(agent, repo, fault):
    big = repo.infos["slow"]  # 1.2 MB: big enough to resume part-way
    repo.server.faults = fault
    try:
        delay, d = agent.apply(big)
    finally:
        repo.server.faults = Faults()
    assert delay is not None and delay > 0
    last = agent.link.events[-1]
    assert last["state"] == "DOWNLOADING" and "retrying" in last["detail"]
    assert agent.runtime.active is None
    part = agent.slots.staging_root / slot_name(ref(big)) / "model.onnx.part"
    kept = part.stat().st_size if part.exists() else 0
    if fault.status is None:
        assert 0 < kept <= CUT  # kept for the resume
    repo.server.requests.clear()
    assert agent.reconciler.run_pass(d) is None
    assert agent.link.events[-1]["state"] == "SUCCEEDED"
    assert agent.serving() == ref(big)
    ranges = [r.range for r in repo.server.requests if r.path.endswith(".onnx")]
    assert ranges == ([f"bytes={kept}-"] if kept else [None])


def test_rollback_action_reactivates_previous(agent, repo):
    agent.apply(repo.infos["v1"])
    agent.apply(repo.infos["v2"])
    agent.apply(action=Action.ROLLBACK)
    assert agent.link.events[-1]["state"] == "ROLLED_BACK"
    assert agent.serving() == ref(repo.infos["v1"])
    pointer = agent.slots.pointer()
    assert (pointer.active, pointer.previous) == (slot_name(ref(repo.infos["v1"])), slot_name(ref(repo.infos["v2"])))


def test_rollback_without_previous_fails(agent, repo):
    agent.apply(repo.infos["v1"])
    agent.apply(action=Action.ROLLBACK)
    assert agent.link.events[-1]["state"] == "FAILED"
    assert "no previous model" in agent.link.events[-1]["detail"]


def test_maintenance_window_holds_activation(agent, repo, tmp_path):
    agent.apply(repo.infos["v1"])
    later = datetime.now().astimezone() + timedelta(hours=3)
    closed = Window(cron=f"{later.minute} {later.hour} * * *", duration_s=600)
    delay, d = agent.apply(repo.infos["v2"], window=closed)
    assert delay == WINDOW_RECHECK_S
    assert agent.link.states(2)[-1] == "WAITING_WINDOW"
    assert agent.serving() == ref(repo.infos["v1"])
    assert agent.slots.get(slot_name(ref(repo.infos["v2"]))) is not None  # staged and installed
    # a restarted agent (fresh reconciler on the same state dir) resumes the wait
    again = Agent(tmp_path, repo)
    again.runtime.swap(again.runtime.load(again.slots.active().model, again.slots.active().meta.ref))
    assert again.reconciler.run_pass(d) == WINDOW_RECHECK_S
    open_now = Window(cron="* * * * *", duration_s=60)
    # the journal keeps the desired state it started with; a new generation brings the open window
    d_open = desired(agent.device, d.generation + 1, repo.infos["v2"], window=open_now)
    assert again.reconciler.run_pass(d_open) is None
    assert again.serving() == ref(repo.infos["v2"])
    again.close()


def test_disk_full_fails_cleanly_and_keeps_serving(tmp_path, repo):
    healthy = Agent(tmp_path, repo)
    healthy.apply(repo.infos["v1"])
    healthy.close()

    def full_for_slots(f, data):
        if b"model_sha256" in data:  # the slot install (meta.json) is the write that does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    agent = Agent(tmp_path, repo, writer=full_for_slots)
    agent.runtime.swap(agent.runtime.load(agent.slots.active().model, agent.slots.active().meta.ref))
    agent.generation = 1
    agent.apply(repo.infos["v2"])
    last = agent.link.events[-1]
    assert last["state"] == "FAILED" and "disk full" in last["detail"], last
    assert agent.serving() == ref(repo.infos["v1"])
    after = Slots(agent.config.state_dir)
    assert after.active().meta.ref == ref(repo.infos["v1"])
    assert after.get(slot_name(ref(repo.infos["v2"]))) is None
    assert list(after.staging_root.glob("*")) == []  # cleaned after the failure
    agent.close()


def test_retries_never_trip_the_loop_guard_but_a_crash_loop_does(tmp_path, repo):
    agent = Agent(tmp_path, repo)
    repo.server.faults = Faults(match=".onnx", status=404)
    try:
        _delay, d = agent.apply(repo.infos["v1"])
        for _ in range(LOOP_LIMIT + 2):
            assert agent.reconciler.run_pass(d) is not None  # still retrying, not failed
    finally:
        repo.server.faults = Faults()
    assert agent.link.events[-1]["state"] == "DOWNLOADING"
    # a process that keeps dying in the same step: each restart resumes it once
    for _ in range(LOOP_LIMIT):
        journal = agent.slots.journal()
        journal.enter(State.DOWNLOAD)
        agent.slots.save_journal(journal)
    restarted = Agent(tmp_path, repo)
    assert restarted.reconciler.run_pass(d) is None
    last = restarted.link.events[-1]
    assert last["state"] == "FAILED" and "crash loop" in last["detail"]
    agent.close()
    restarted.close()


# --- the agent never dies on a desired state (issue 10) -------------------------------


def closed_window() -> Window:
    later = datetime.now().astimezone() + timedelta(hours=3)
    return Window(cron=f"{later.minute} {later.hour} * * *", duration_s=600)


def test_a_handler_raising_unexpectedly_fails_the_update_and_keeps_serving(agent, repo, monkeypatch):
    agent.apply(repo.infos["v1"])

    def boom(_journal):
        raise RuntimeError("boom")

    monkeypatch.setitem(agent.reconciler._handlers, State.VERIFY, boom)
    assert agent.apply(repo.infos["v2"])[0] is None
    last = agent.link.events[-1]
    assert (last["state"], last["generation"]) == ("FAILED", 2)
    assert last["detail"] == "verify failed unexpectedly: RuntimeError: boom"
    assert agent.serving() == ref(repo.infos["v1"])
    monkeypatch.undo()
    agent.apply(repo.infos["v2"])  # the next good generation
    assert agent.link.states(3)[-1] == "SUCCEEDED" and agent.serving() == ref(repo.infos["v2"])


@pytest.mark.parametrize("override, serving", [
    ({"action": Action.NONE}, "v2"),      # an abort that leaves the device as it is
    ({"info": "v2"}, "v2"),               # an abort that holds the device on what ran before
    ({"action": Action.ROLLBACK}, "v1"),  # a cloud rollback
])
def test_a_newer_generation_closes_a_journal_stuck_waiting(agent, repo, tmp_path, override, serving):
    """Any newer generation overrides a wait that would never end, for good: a restart (whose
    first pass has no desired state yet) must not resume it."""
    for version in ("v1", "v2"):
        agent.apply(repo.infos[version])
    agent.apply(repo.infos["v7"], window=closed_window())
    assert agent.link.states(3)[-1] == "WAITING_WINDOW"
    fields = dict(override)
    agent.apply(repo.infos[fields.pop("info")] if "info" in fields else None, **fields)
    assert agent.link.states(3)[-1] == "FAILED"
    assert [e["detail"] for e in agent.link.events if e["generation"] == 3][-1].startswith("wait_window superseded by generation 4")
    assert agent.slots.journal().state.terminal and agent.serving() == ref(repo.infos[serving])
    restarted = Agent(tmp_path, repo)
    restarted.serve_active()
    assert restarted.reconciler.run_pass(None) is None
    assert restarted.link.events == [] and restarted.serving() == ref(repo.infos[serving])
    restarted.close()


def test_a_journal_that_no_longer_parses_is_a_failed_execution(tmp_path, repo):
    first = Agent(tmp_path, repo)
    first.apply(repo.infos["v1"])
    first.close()
    # what an older agent journalled: waiting for a window this release refuses to parse
    stale = desired(first.device, 2, repo.infos["v2"]).to_dict()
    stale["window"] = {"cron": "61 25 * * *", "duration_s": 7200}
    (first.config.state_dir / "journal.json").write_text(json.dumps(
        {"desired": stale, "state": "wait_window", "slot": None, "detail": "", "entries": {"wait_window": 1}}))
    agent = Agent(tmp_path, repo)
    agent.serve_active()
    agent.reconciler.announce()
    (failed,) = agent.link.events
    assert (failed["state"], failed["generation"], failed["deployment"]) == ("FAILED", 2, "dep-2")
    assert "journal on disk no longer parses" in failed["detail"] and "minute 61 is out of range" in failed["detail"]
    assert agent.link.reports[-1]["generation"] == 2
    agent.generation = 2
    agent.apply(repo.infos["v2"])  # the next good generation
    assert agent.link.states(3)[-1] == "SUCCEEDED" and agent.serving() == ref(repo.infos["v2"])
    agent.close()


def test_a_pass_raising_outside_a_handler_fails_the_execution_in_progress(agent, repo, monkeypatch):
    """What the daemon's last resort does when a pass raises: the execution fails with the
    reason (reported) and the next generation is taken."""
    agent.apply(repo.infos["v1"])
    monkeypatch.setitem(agent.reconciler._handlers, State.DOWNLOAD, lambda _j: HandlerResult(Outcome.GATE_FAILED, "?"))
    with pytest.raises(TransitionError) as info:
        agent.apply(repo.infos["v2"])
    agent.reconciler.fail(info.value)
    last = agent.link.events[-1]
    assert (last["state"], last["generation"]) == ("FAILED", 2)
    assert last["detail"] == "agent error: TransitionError: no transition from download on gate_failed"
    monkeypatch.undo()
    agent.apply(repo.infos["v2"])
    assert agent.link.states(3)[-1] == "SUCCEEDED" and agent.serving() == ref(repo.infos["v2"])
