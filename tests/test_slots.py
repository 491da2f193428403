"""Slots on disk: atomic pointer, install, rollback, GC, crash points, disk full."""
import errno
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from edgefleet.agent import slots as slots_mod
from edgefleet.agent.errors import AgentError
from edgefleet.agent.slots import SlotMeta, Slots, slot_name
from edgefleet.agent.state import LOOP_LIMIT, Journal, State
from edgefleet.common.errors import StorageError
from edgefleet.common.hardware import Requirements
from edgefleet.common.protocol import Desired, ModelRef, TargetInfo


def ref(version: str, release: int) -> ModelRef:
    return ModelRef("digits", version, "cpu-fp32", release)


def stage_and_install(slots: Slots, r: ModelRef, body: bytes | None = None) -> str:
    name = slot_name(r)
    body = body or f"model {r.version}".encode()
    staging = slots.staging(name)
    (staging / slots_mod.MODEL_FILE).write_bytes(body)
    (staging / slots_mod.GOLDEN_FILE).write_bytes(b"golden")
    info = TargetInfo(model=r.model, version=r.version, variant=r.variant, release=r.release,
                      requirements=Requirements(), golden=f"digits/{r.version}/cpu-fp32.golden.npz", golden_sha256="0" * 64)
    meta = SlotMeta(r, info, hashlib.sha256(body).hexdigest(), installed=1.0)
    slots.install(name, meta)
    return name


def assert_consistent(slots: Slots) -> None:
    """The pointer only names complete slots whose bytes match their metadata."""
    pointer = slots.pointer()
    for name in (pointer.active, pointer.previous):
        if name is None:
            continue
        slot = slots.get(name)
        assert slot is not None, f"pointer names missing slot {name}"
        assert hashlib.sha256(slot.model.read_bytes()).hexdigest() == slot.meta.model_sha256


def test_install_activate_rollback(tmp_path):
    slots = Slots(tmp_path)
    assert slots.active() is None
    v1 = stage_and_install(slots, ref("1.0.0", 1))
    assert not (slots.staging_root / v1).exists()
    slots.activate(v1)
    v2 = stage_and_install(slots, ref("2.0.0", 2))
    pointer = slots.activate(v2)
    assert (pointer.active, pointer.previous) == (v2, v1)
    assert slots.activate(v2) == pointer  # idempotent
    assert slots.highest_release("digits") == 2
    pointer = slots.rollback()
    assert (pointer.active, pointer.previous) == (v1, v2)
    assert slots.active().meta.ref.version == "1.0.0"
    # a rollback does not lower the release high-water mark
    assert slots.highest_release("digits") == 2
    assert (slots.root / "pointer.json").read_text().startswith("{")
    assert not [p for p in slots.root.iterdir() if p.name.endswith(".tmp")]


def test_rollback_without_previous_is_a_clear_error(tmp_path):
    slots = Slots(tmp_path)
    with pytest.raises(AgentError, match="no previous model"):
        slots.rollback()
    slots.activate(stage_and_install(slots, ref("1.0.0", 1)))
    with pytest.raises(AgentError, match="no previous model"):
        slots.rollback()


def test_activate_refuses_a_slot_that_is_not_installed(tmp_path):
    slots = Slots(tmp_path)
    slots.staging("x")
    with pytest.raises(AgentError, match="not installed"):
        slots.activate("x")
    assert slots.pointer().active is None


def test_gc_keeps_active_previous_and_current_staging(tmp_path):
    slots = Slots(tmp_path)
    names = [stage_and_install(slots, ref(f"{i}.0.0", i)) for i in (1, 2, 3)]
    slots.activate(names[0])
    slots.activate(names[1])
    slots.staging("in-progress")
    slots.staging("stale")
    (slots.root / ".pointer.json.tmp").write_text("half")
    removed = slots.gc(keep_staging="in-progress")
    assert sorted(removed) == sorted([names[2], ".staging/stale"])
    assert {p.name for p in slots.root.iterdir()} == {names[0], names[1], ".staging", "pointer.json"}
    assert (slots.staging_root / "in-progress").is_dir()
    slots.discard(names[1])  # previous: refused silently, it is the rollback target
    assert slots.get(names[1]) is not None


def test_journal_round_trip_and_loop_guard(tmp_path):
    slots = Slots(tmp_path)
    assert slots.journal() is None
    d = Desired(device="d", generation=7, model="digits", version="1.0.0", variant="cpu-fp32",
                target="digits/1.0.0/cpu-fp32.onnx")
    journal = Journal(desired=d, state=State.DOWNLOAD)
    for _ in range(LOOP_LIMIT):
        assert journal.enter(State.ACTIVATE)
    assert not journal.enter(State.ACTIVATE)
    slots.save_journal(journal)
    loaded = slots.journal()
    assert loaded.generation == 7 and loaded.state is State.ACTIVATE
    assert loaded.entries == {"activate": LOOP_LIMIT + 1}
    (tmp_path / "journal.json").write_text("{garbage")
    assert slots.journal() is None


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(12))
def test_crash_at_every_filesystem_step_leaves_a_complete_active_slot(tmp_path, monkeypatch, crash_at):
    slots = Slots(tmp_path)
    v1 = stage_and_install(slots, ref("1.0.0", 1))
    slots.activate(v1)
    calls = {"n": 0}

    def crashing(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash()
            return real(*args, **kwargs)
        return wrapper

    for fn in ("replace", "rename", "fsync"):
        monkeypatch.setattr(slots_mod.os, fn, crashing(getattr(os, fn)))
    r2 = ref("2.0.0", 2)
    try:
        name = stage_and_install(slots, r2)
        slots.activate(name)
    except (Crash, StorageError):
        pass
    monkeypatch.undo()
    # "reboot": a fresh view of the same directory
    after = Slots(tmp_path)
    assert_consistent(after)
    assert after.active().meta.ref.version in ("1.0.0", "2.0.0")
    # running the same steps again finishes the work
    name = slot_name(r2)
    if after.get(name) is None:
        name = stage_and_install(after, r2)
    after.activate(name)
    assert after.active().meta.ref.version == "2.0.0"
    assert after.previous().meta.ref.version == "1.0.0"
    after.gc()
    assert_consistent(after)


def test_disk_full_injected_writer_leaves_nothing_half_written(tmp_path):
    slots = Slots(tmp_path)
    v1 = stage_and_install(slots, ref("1.0.0", 1))
    slots.activate(v1)
    v2 = stage_and_install(slots, ref("2.0.0", 2))
    before = (slots.root / "pointer.json").read_bytes()

    def full(f, data):
        f.write(data[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    broken = Slots(tmp_path, writer=full)
    with pytest.raises(StorageError, match="disk full") as e:
        broken.activate(v2)
    assert "\n" not in str(e.value)
    assert (slots.root / "pointer.json").read_bytes() == before
    assert not [p for p in slots.root.iterdir() if p.name.endswith(".tmp")]
    assert slots.active().name == v1


def test_disk_full_by_file_size_limit_in_a_real_process(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past the limit (EFBIG), as a full disk would."""
    v1 = stage_and_install(Slots(tmp_path), ref("1.0.0", 1))
    Slots(tmp_path).activate(v1)
    r2 = ref("2.0.0", 2)
    staging = Slots(tmp_path).staging(slot_name(r2))
    (staging / slots_mod.MODEL_FILE).write_bytes(b"small model")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from edgefleet.common.errors import StorageError
        from edgefleet.common.protocol import ModelRef, TargetInfo
        from edgefleet.agent.slots import SlotMeta, Slots
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # meta.json is several hundred bytes: the first write past 200 bytes fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
        ref = ModelRef("digits", "2.0.0", "cpu-fp32", 2)
        info = TargetInfo(model="digits", version="2.0.0", variant="cpu-fp32", release=2, requirements={{}},
                          golden="g", golden_sha256="0" * 64)
        slots = Slots({str(tmp_path)!r})
        try:
            slots.install({slot_name(r2)!r}, SlotMeta(ref, info, "0" * 64, installed=1.0))
        except StorageError as e:
            print(e)
            sys.exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("disk full while writing")
    slots = Slots(tmp_path)
    assert_consistent(slots)
    assert slots.active().name == v1
    assert slots.get(slot_name(r2)) is None
    assert not [p for p in staging.iterdir() if p.name.endswith(".tmp")]
