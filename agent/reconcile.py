"""The level-triggered reconcile pass: compare desired with what runs, take the next step.

Each update state has one small handler that does its (idempotent) work and
returns one :class:`~.state.Outcome`; :mod:`.state` decides what comes next.
The journal is saved before a handler acts, so after a crash the same step
runs again and finishes or undoes the work. Nothing is served that has not
passed TUF verification and the on-device gate.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgefleet.common.errors import EdgefleetError
from edgefleet.common.fs import storage_error
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import (
    Action,
    BenchmarkReport,
    Desired,
    ExecutionState,
    GateReport,
    ModelRef,
    TargetInfo,
    TelemetryPayload,
)
from edgefleet.common.retry import Backoff

from . import window
from .errors import (
    AgentError,
    GateError,
    ModelError,
    RejectedError,
    TransportError,
    VerificationError,
)
from .fetch import check_release
from .gate import run_gate
from .runtime import LoadedModel, ModelRuntime
from .slots import GOLDEN_FILE, MODEL_FILE, SlotMeta, Slots, slot_name
from .state import Journal, Outcome, State, first_state, next_state

log = logging.getLogger(__name__)

WINDOW_RECHECK_S = 30.0
RETRY_BACKOFF = Backoff(min_s=2.0, max_s=300.0)  # transport trouble: retry, never give up


class Updater(Protocol):
    """What reconcile needs of :class:`.fetch.ModelUpdater`."""

    def refresh(self) -> None: ...
    def find(self, target_path: str) -> tuple[Any, TargetInfo]: ...
    def target(self, target_path: str) -> Any: ...
    def download(self, target_file: Any, dest: Path) -> Path: ...


class Link(Protocol):
    """What reconcile needs of :class:`.mqtt.AgentLink`."""

    def report(self, generation: int, **fields: Any) -> object: ...
    def event(self, state: ExecutionState, **fields: Any) -> object: ...
    def telemetry(self, payload: TelemetryPayload) -> object: ...


class HandlerResult:
    """Carries a handler's outcome, its one-line reason and what the activation gate measured."""

    def __init__(self, outcome: Outcome, detail: str = "", gate: GateReport | None = None) -> None:
        self.outcome, self.detail, self.gate = outcome, detail, gate


class Reconciler:
    def __init__(
        self,
        slots: Slots,
        updater: Updater,
        runtime: ModelRuntime,
        link: Link,
        profile: HardwareProfile,
        backoff: Backoff = RETRY_BACKOFF,
        on_step: Callable[[], None] = lambda: None,
    ) -> None:
        self.slots = slots
        self.updater = updater
        self.runtime = runtime
        self.link = link
        self.profile = profile
        self.backoff = backoff
        self._attempts = 0      # consecutive retries of the current step
        self._resumed = False   # the first pass of this process resumes an interrupted step
        self._on_step = on_step  # the daemon pings the watchdog between steps
        self._refreshed = False
        self._targets: dict[str, tuple[Any, TargetInfo]] = {}
        self._handlers: dict[State, Callable[[Journal], HandlerResult]] = {
            State.DOWNLOAD: self._download,
            State.VERIFY: self._verify,
            State.STAGE: self._stage,
            State.WAIT_WINDOW: self._wait_window,
            State.ACTIVATE: self._activate,
            State.ROLLBACK: self._rollback,
        }

    # --- the pass ------------------------------------------------------------

    def run_pass(self, desired: Desired | None) -> float | None:
        """One level-triggered pass. Returns seconds until the next pass is due (None: on change only)."""
        self._refreshed = False
        self._targets.clear()
        journal = self._execution(desired)
        if journal is None:
            return None
        while not journal.state.terminal:
            step = self._run_handler(journal)
            state = next_state(journal.state, step.outcome)
            if state is journal.state:  # stay, and try again later
                return self._stay(journal, step)
            self._attempts = 0
            if not journal.enter(state, step.detail):
                journal.enter(State.FAILED,
                              f"{state.value} was entered too often (crash loop?); giving up: {step.detail}")
            self._save(journal)
            self._event(journal, gate=step.gate)
        self._report(journal)
        self.slots.gc()
        return None

    def _stay(self, journal: Journal, step: HandlerResult) -> float:
        if step.outcome is Outcome.WINDOW_CLOSED:
            return WINDOW_RECHECK_S
        delay = self.backoff.delay(self._attempts)
        self._attempts += 1
        self._event(journal, detail=f"{step.detail}; retrying in {delay:.0f}s")
        return delay

    def _execution(self, desired: Desired | None) -> Journal | None:
        """The execution to work on: the journalled one, or a new one for a newer generation."""
        journal = self.slots.journal()
        if journal is not None and not journal.state.terminal:
            if desired is None or desired.generation <= journal.generation:
                if not self._resumed:
                    # interrupted by a crash or restart: this entry counts toward the loop guard
                    self._resumed = True
                    if not journal.enter(journal.state, journal.detail):
                        journal.enter(State.FAILED, f"{journal.state.value} was resumed too often (crash loop?)")
                    self._save(journal)
                    self._event(journal)
                return journal
            # a newer generation (an install, a rollback, or an abort's "none") overrides whatever
            # this one waits for, and closes it for good: a restart must not resume it
            self._close(journal, f"{journal.state.value} superseded by generation {desired.generation} "
                                 f"({desired.action})")
        self._resumed = True
        finished = journal.generation if journal is not None and journal.state.terminal else None
        active = self.slots.active()
        state = first_state(desired, active.meta.ref if active else None, finished)
        if state is None or desired is None:
            return None
        journal = Journal(desired=desired, state=state)
        journal.enter(state)
        self._save(journal)
        self._event(journal)
        return journal

    def _close(self, journal: Journal, reason: str) -> None:
        journal.enter(State.FAILED, reason)
        self._save(journal)
        self._event(journal)

    def _run_handler(self, journal: Journal) -> HandlerResult:
        self._on_step()
        try:
            return self._handlers[journal.state](journal)
        except TransportError as e:
            return HandlerResult(Outcome.RETRY, str(e))
        except RejectedError as e:
            return HandlerResult(Outcome.REJECTED, str(e))
        except EdgefleetError as e:  # the remote sent something unusable, or the disk is full: terminal
            return HandlerResult(Outcome.FAILED, str(e))
        except Exception as e:  # a bug met on this desired state: fail it, keep serving what runs
            log.exception("%s of generation %d failed unexpectedly", journal.state.value, journal.generation)
            return HandlerResult(Outcome.FAILED, f"{journal.state.value} failed unexpectedly: {type(e).__name__}: {e}")

    # --- handlers (one job each, idempotent) ----------------------------------

    def _download(self, journal: Journal) -> HandlerResult:
        desired = journal.desired
        target_file, info = self._find(desired.target or "")
        if (info.model, info.version, info.variant) != (desired.model, desired.version, desired.variant):
            raise VerificationError(
                f"signed target {desired.target} is {info.model} {info.version} {info.variant}, "
                f"not what the desired state names"
            )
        unmet = info.requirements.unmet(self.profile)
        if unmet:
            raise RejectedError(f"{info.variant} cannot run here: {'; '.join(unmet)}")
        check_release(info, self.slots.highest_release(info.model))
        name = slot_name(_ref(info))
        journal.slot = name
        self._save(journal)
        if self.slots.get(name) is not None:
            return HandlerResult(Outcome.DONE, f"{name} is already installed")
        staging = self.slots.staging(name)
        golden_file = self._golden(info)
        self._fetch(target_file, staging / MODEL_FILE)
        self._fetch(golden_file, staging / GOLDEN_FILE)
        return HandlerResult(Outcome.DONE, f"downloaded {target_file.length} bytes")

    def _verify(self, journal: Journal) -> HandlerResult:
        name = journal.slot or ""
        if self.slots.get(name) is not None:
            return HandlerResult(Outcome.DONE, f"{name} is installed")
        target_file, info = self._find(journal.desired.target or "")
        staging = self.slots.staging_root / name
        golden_file = self._golden(info)
        for file, path in ((target_file, staging / MODEL_FILE), (golden_file, staging / GOLDEN_FILE)):
            problem = _mismatch(file, path)
            if problem:
                path.unlink(missing_ok=True)
                return HandlerResult(Outcome.RETRY, problem)
        if golden_file.hashes.get("sha256") != info.golden_sha256:
            raise VerificationError(f"golden set of {name} does not match the digest its model target names")
        check_release(info, self.slots.highest_release(info.model))
        return HandlerResult(Outcome.DONE, f"{name} matches its signed length and hashes")

    def _stage(self, journal: Journal) -> HandlerResult:
        name = journal.slot or ""
        if self.slots.get(name) is None:
            target_file, info = self._find(journal.desired.target or "")
            meta = SlotMeta(_ref(info), info, target_file.hashes["sha256"], installed=time.time())
            self.slots.install(name, meta)
        held = journal.desired.window
        if held is not None and not window.is_open(held):
            return HandlerResult(Outcome.WINDOW_CLOSED, f"waiting for maintenance window {held.cron}")
        return HandlerResult(Outcome.DONE, f"{name} installed")

    def _wait_window(self, journal: Journal) -> HandlerResult:
        if window.is_open(journal.desired.window):
            return HandlerResult(Outcome.DONE, "maintenance window is open")
        return HandlerResult(Outcome.WINDOW_CLOSED, "maintenance window is closed")

    def _activate(self, journal: Journal) -> HandlerResult:
        name = journal.slot or ""
        slot = self.slots.get(name)
        if slot is None:
            return HandlerResult(Outcome.RETRY, f"slot {name} is missing")
        active = self.runtime.active
        if self.slots.pointer().active == name and active is not None and active.ref == slot.meta.ref:
            return HandlerResult(Outcome.DONE, f"{name} is active")
        model = slot.meta.ref.model
        previous = self.slots.active()
        # A p99 regression is measured against an earlier version of the same model; another model
        # (a device switching what it runs) takes other inputs and says nothing about this one's speed.
        same = previous is not None and previous.meta.ref.model == model
        recorded_p99 = previous.meta.p99_ms if previous is not None and same else None
        reports: list[GateReport] = []  # the gate's, once it ran

        def gate_and_commit(loaded: LoadedModel) -> None:
            self._on_step()
            serving = self.runtime.active  # side by side: the previous version, measured in turn with the new
            if serving is not None and (serving.ref is None or serving.ref.model != model):
                serving = None
            result = run_gate(loaded, slot.golden, journal.desired.gate, recorded_p99, baseline=serving)
            reports.append(result.report)
            log.log(logging.INFO if result.passed else logging.WARNING, "activation gate of %s %s: %s",
                    name, "passed" if result.passed else "failed", result.reason)
            if not result.passed:
                raise GateError(result.reason)
            if result.report.benchmark is not None:
                self.slots.record_p99(name, result.report.benchmark.p99_ms)
            # the pointer moves before the swap: a crash in between serves the new, gated model
            self.slots.activate(name)

        try:
            outcome = self.runtime.replace(slot.model, slot.meta.ref, gate_and_commit)
        except (GateError, ModelError) as e:
            self.slots.discard(name)
            return HandlerResult(Outcome.GATE_FAILED, str(e), reports[0] if reports else None)
        finally:
            if reports:
                self.link.telemetry(BenchmarkReport(model=slot.meta.ref, gate=reports[0]))
        detail = "swapped (requests held while the old model made room)" if outcome.preserved else "swapped"
        return HandlerResult(Outcome.DONE, detail, reports[0])

    def _rollback(self, journal: Journal) -> HandlerResult:
        previous = self.slots.previous()
        if previous is None:
            raise AgentError("no previous model is installed to roll back to")
        def commit(_loaded: LoadedModel) -> None:  # the previous slot passed its gate when first activated
            self.slots.rollback()

        self.runtime.replace(previous.model, previous.meta.ref, commit)
        return HandlerResult(Outcome.DONE, f"rolled back to {previous.meta.ref.model} {previous.meta.ref.version}")

    # --- helpers --------------------------------------------------------------

    def _find(self, path: str) -> tuple[Any, TargetInfo]:
        """A signed model target and its edgefleet fields (metadata refreshed once per pass)."""
        if path not in self._targets:
            self._refresh()
            self._targets[path] = self.updater.find(path)
        return self._targets[path]

    def _golden(self, info: TargetInfo) -> Any:
        self._refresh()
        return self.updater.target(info.golden)

    def _refresh(self) -> None:
        if not self._refreshed:
            self.updater.refresh()
            self._refreshed = True

    def _fetch(self, target_file: Any, dest: Path) -> None:
        if _mismatch(target_file, dest) is None:
            return  # downloaded before a restart
        self._on_step()
        try:
            self.updater.download(target_file, dest)
        except OSError as e:
            raise storage_error(e, str(dest)) from e

    def _save(self, journal: Journal) -> None:
        self.slots.save_journal(journal)

    def _event(self, journal: Journal, detail: str | None = None, gate: GateReport | None = None) -> None:
        """Report the execution's state (and log it: each is a lifecycle step an operator reads)."""
        desired = journal.desired
        said = journal.detail if detail is None else detail
        log.log(logging.WARNING if journal.state in (State.FAILED, State.REJECTED) else logging.INFO,
                "update %d (%s%s): %s%s", desired.generation, _what(desired),
                f", rollout {desired.deployment}" if desired.deployment else "", journal.state.value,
                f": {said}" if said else "")
        self.link.event(
            journal.state.reported,
            generation=desired.generation,
            deployment=desired.deployment,
            model=desired.model,
            version=desired.version,
            variant=desired.variant,
            detail=(journal.detail if detail is None else detail)[:2000],
            gate=gate,
        )

    def _report(self, journal: Journal | None) -> None:
        """Announce what runs, and how the last execution ended once it has (the controller settles
        the execution from this report when its events were lost on the way)."""
        active, previous, loaded = self.slots.active(), self.slots.previous(), self.runtime.active
        self.link.report(
            generation=journal.generation if journal else 0,
            outcome=journal.state.reported if journal is not None and journal.state.terminal else None,
            active=active.meta.ref if active else None,
            previous=previous.meta.ref if previous else None,
            memory_kb=loaded.memory_kb if loaded is not None else None,
        )

    def report(self) -> None:
        """Announce what runs now (on start and after a local rollback)."""
        self._report(self.slots.journal())

    def announce(self) -> None:
        """On start: report, and repeat a finished execution's last event, which a
        crash between journalling it and publishing it would otherwise lose."""
        self.report()
        journal = self.slots.journal()
        if journal is not None and journal.state.terminal:
            self._event(journal)

    def fail(self, error: Exception) -> None:
        """The last resort after a pass raised ``error`` (a bug): the execution in progress fails
        with it as the reason (reported), so the same error is not met again on every pass."""
        journal = self.slots.journal()
        if journal is not None and not journal.state.terminal:
            self._close(journal, f"agent error: {type(error).__name__}: {error}")


def _what(desired: Desired) -> str:
    if desired.action is not Action.INSTALL:
        return desired.action.value
    return " ".join(p for p in (desired.model, desired.version, desired.variant) if p)


def _ref(info: TargetInfo) -> ModelRef:
    return ModelRef(model=info.model, version=info.version, variant=info.variant, release=info.release)


def _mismatch(target_file: Any, path: Path) -> str | None:
    """Why the file at ``path`` is not the signed target (None when it is)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path.name} is not downloaded"
    if size != target_file.length:
        return f"{path.name} is {size} bytes, the signed length is {target_file.length}"
    for algorithm, expected in target_file.hashes.items():
        digest = hashlib.new(algorithm)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            return f"{path.name} does not match its signed {algorithm}"
    return None
