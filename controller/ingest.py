"""Apply validated wire messages from devices to the database, idempotently.

One call applies one batch in one transaction (all or nothing): the bridge hands
over whatever queued up, so a busy controller commits hundreds of messages at once.
Every rule below makes a redelivered or late message harmless:

- Status: an offline will with an older boot than the device's current one is ignored.
- Reported: a report older (boot, seq) than the stored one is ignored.
- Event: unique per (device, boot, seq), checked before insert and by the UNIQUE constraint.
- Telemetry: unique per (device, boot, seq); looked up only below the device's high-water mark.
Messages from devices that are not enrolled (or were removed meanwhile) are dropped
and counted. A device can only claim so much (``_claim_refusal``): its boot moves
forward by at most MAX_BOOT_STEP, numbers fit the database, counters are non-negative
and bounded, and an event moves an execution only for a generation the device was sent.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import (
    BenchmarkReport,
    CounterSnapshot,
    DeviceMessage,
    Event,
    Heartbeat,
    Message,
    Reported,
    Status,
    Telemetry,
)

from .db.models import (
    Benchmark,
    Device,
    EventRecord,
    Execution,
    TelemetryRecord,
    utcnow,
)
from .db.session import Database

log = logging.getLogger(__name__)

MAX_BOOT_STEP = 1000      # agent restarts between two messages the controller sees; more is a forged boot
MAX_INT = 2**31 - 1       # boot, seq and generation columns are 32-bit
MAX_COUNT = 2**53         # counters stay exact as JSON numbers


@dataclass
class IngestResult:
    applied: int = 0
    duplicates: int = 0    # QoS 1 redeliveries
    stale: int = 0         # older than what is stored (late will, old report, old attempt)
    unknown: int = 0       # device not enrolled, or removed
    refused: int = 0       # claims out of bounds (boot jump, counters, a generation never sent)

    def __iadd__(self, other: IngestResult) -> IngestResult:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.stale += other.stale
        self.unknown += other.unknown
        self.refused += other.refused
        return self


def message_time(ts: float) -> datetime:
    """The device's clock if it is plausible, else now."""
    try:
        return datetime.fromtimestamp(ts, UTC) if ts > 0 else utcnow()
    except (OverflowError, OSError, ValueError):
        return utcnow()


class Ingest:
    """``apply(messages)``: one transaction per batch."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def apply(self, messages: Sequence[DeviceMessage]) -> IngestResult:
        """Raises Unavailable when the database is down (nothing written; apply again later)."""
        with self.db.unit_of_work() as session:
            return _Batch(session).run(messages)


class _Batch:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.result = IngestResult()
        self.now = utcnow()
        self.telemetry_rows: list[dict[str, Any]] = []
        self.benchmark_rows: list[dict[str, Any]] = []
        self.event_rows: list[dict[str, Any]] = []
        self.executions: dict[tuple[str, str], Execution] = {}
        self.seen_telemetry: set[tuple[str, int, int]] = set()

    def run(self, messages: Sequence[DeviceMessage]) -> IngestResult:
        devices = self._lock_devices({m.device for m in messages})
        events = [m for m in messages if isinstance(m, Event)]
        seen_events = self._stored(EventRecord, events)
        self.executions = self._executions(events)
        self.seen_telemetry = self._stored(TelemetryRecord, [
            m for m in messages if isinstance(m, Telemetry) and m.device in devices
            and (m.boot, m.seq) <= _telemetry_mark(devices[m.device])
        ])
        for message in messages:
            device = devices.get(message.device)
            if device is None:
                log.warning("dropped %s from unknown device %r (not enrolled)",
                            type(message).__name__, message.device)
                self.result.unknown += 1
            elif (refusal := _claim_refusal(device, message)) is not None:
                log.warning("dropped %s from %s: %s", type(message).__name__, device.id, refusal)
                self.result.refused += 1
            elif isinstance(message, Status):
                self._status(device, message)
            elif isinstance(message, Reported):
                self._reported(device, message)
            elif isinstance(message, Event):
                self._event(device, message, seen_events)
            elif isinstance(message, Telemetry):
                self._telemetry(device, message)
            else:
                raise TypeError(f"ingest got a {type(message).__name__}, which devices do not send")
        self._flush()
        return self.result

    def _lock_devices(self, ids: set[str]) -> dict[str, Device]:
        query = sa.select(Device).where(Device.id.in_(sorted(ids))).order_by(Device.id)
        if self.session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()  # replicas: one batch per device at a time
        return {d.id: d for d in self.session.scalars(query)}

    def _executions(self, events: list[Event]) -> dict[tuple[str, str], Execution]:
        """The executions these events name, by (rollout, device), in one query."""
        named = [e for e in events if e.deployment]
        if not named:
            return {}
        query = sa.select(Execution).where(
            Execution.rollout_id.in_({e.deployment for e in named}), Execution.device_id.in_({e.device for e in named})
        )
        return {(x.rollout_id, x.device_id): x for x in self.session.scalars(query)}

    def _stored(self, table: type[EventRecord] | type[TelemetryRecord], messages: list) -> set[tuple[str, int, int]]:
        """Which of these (device, boot, seq) are already in the table."""
        if not messages:
            return set()
        query = sa.select(table.device_id, table.boot, table.seq).where(
            table.device_id.in_({m.device for m in messages}),
            table.seq.in_({m.seq for m in messages}),
        )
        return {(d, b, s) for d, b, s in self.session.execute(query)}

    def _seen(self, device: Device, boot: int) -> None:
        """A message from the device's current (or a newer) boot: it is alive."""
        if boot >= device.boot:
            device.boot = boot
            device.online = True
            device.last_seen = self.now

    # --- one handler per message type ---------------------------------------

    def _status(self, device: Device, message: Status) -> None:
        if message.boot < device.boot:
            self.result.stale += 1  # a will from an earlier session, delivered late
            return
        device.boot = message.boot
        device.online = message.online
        if message.online:
            device.last_seen = self.now
        self.result.applied += 1

    def _reported(self, device: Device, message: Reported) -> None:
        stored = device.reported or {}
        if (message.boot, message.seq) < (stored.get("boot", -1), stored.get("seq", -1)):
            self.result.stale += 1
            return
        device.reported = message.to_dict()
        if message.hardware is not None:
            try:
                profile = HardwareProfile.from_dict(message.hardware)
            except (TypeError, ValueError, AttributeError) as e:
                log.warning("device %s reported an unreadable hardware profile: %s", device.id, e)
            else:
                device.hardware = profile.to_dict()
                device.hardware_class = profile.hardware_class
        self._seen(device, message.boot)
        self.result.applied += 1

    def _event(self, device: Device, message: Event, seen: set[tuple[str, int, int]]) -> None:
        execution = self.executions.get((message.deployment, device.id)) if message.deployment else None
        if execution is not None and message.generation > device.desired_generation:
            log.warning("dropped Event from %s: generation %d of %s was never sent to it (latest sent: %d)",
                        device.id, message.generation, message.deployment, device.desired_generation)
            self.result.refused += 1
            return
        key = (device.id, message.boot, message.seq)
        if key in seen:
            self.result.duplicates += 1
            return
        seen.add(key)
        self.event_rows.append({
            "device_id": device.id, "boot": message.boot, "seq": message.seq,
            "generation": message.generation, "deployment": message.deployment, "state": message.state.value,
            "model": message.model, "version": message.version, "variant": message.variant,
            "detail": message.detail, "data": message.gate.to_dict() if message.gate else {},
            "ts": message_time(message.ts),
        })
        if (message.boot, message.seq) > (device.last_event_boot, device.last_event_seq):
            device.last_event_boot, device.last_event_seq = message.boot, message.seq
        self._execution(execution, message)
        self._seen(device, message.boot)
        self.result.applied += 1

    @staticmethod
    def _execution(execution: Execution | None, message: Event) -> None:
        """Move the execution the event names, unless the event is from an earlier attempt."""
        if execution is None or message.generation < execution.generation:
            return
        if execution.state.terminal and message.generation == execution.generation:
            return  # a late, reordered event cannot reopen a finished attempt
        execution.state = message.state
        execution.detail = message.detail

    def _telemetry(self, device: Device, message: Telemetry) -> None:
        # Above the high-water mark is new (the common case, no lookup); below it only
        # if not stored yet (a replica or a reconnect delivered it out of order).
        key = (device.id, message.boot, message.seq)
        if key in self.seen_telemetry:
            self.result.duplicates += 1
            return
        self.seen_telemetry.add(key)
        if (message.boot, message.seq) > _telemetry_mark(device):
            device.last_telemetry_boot, device.last_telemetry_seq = message.boot, message.seq
        ts = message_time(message.ts)
        self.telemetry_rows.append({
            "device_id": device.id, "kind": message.kind.value, "boot": message.boot,
            "seq": message.seq, "data": message.payload.to_dict(), "ts": ts,
        })
        if message.benchmark is not None:
            row = benchmark_row(device, message.benchmark, ts)
            if row is not None:
                self.benchmark_rows.append(row)
        self._seen(device, message.boot)
        self.result.applied += 1

    def _flush(self) -> None:
        if self.telemetry_rows:
            self.session.execute(sa.insert(TelemetryRecord), self.telemetry_rows)
        if self.benchmark_rows:
            self.session.execute(sa.insert(Benchmark), self.benchmark_rows)
        if self.event_rows:
            self.session.execute(self._insert_ignoring_duplicates(), self.event_rows)

    def _insert_ignoring_duplicates(self) -> sa.Insert:
        """A replica that inserted the same event first wins; ours is a no-op."""
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        return insert(EventRecord).on_conflict_do_nothing(index_elements=["device_id", "boot", "seq"])


def _claim_refusal(device: Device, message: DeviceMessage) -> str | None:
    """Why ``message`` claims more than its device can, or None."""
    boot, seq = getattr(message, "boot", 0), getattr(message, "seq", 0)
    if max(boot, seq, getattr(message, "generation", 0)) > MAX_INT:
        return f"boot, seq or generation above {MAX_INT}"
    if device.boot and boot > device.boot + MAX_BOOT_STEP:  # boot 0: never seen, any boot is its first
        return f"boot {boot} jumps more than {MAX_BOOT_STEP} past {device.boot}"
    if isinstance(message, Telemetry) and not all(0 <= n <= MAX_COUNT for n in _counts(message.payload)):
        return f"a counter is negative or above {MAX_COUNT}"
    return None


def _counts(payload: Message) -> list[int]:
    if isinstance(payload, Heartbeat):
        extra = [payload.samples_pending, payload.samples_dropped, payload.rss_kb or 0]
        return extra + _counts(payload.counters)
    if isinstance(payload, CounterSnapshot):
        return [payload.requests, payload.rejected, payload.failures, *payload.latency_counts]
    return []


def _telemetry_mark(device: Device) -> tuple[int, int]:
    return device.last_telemetry_boot, device.last_telemetry_seq


def benchmark_row(device: Device, report: BenchmarkReport, ts: datetime) -> dict[str, Any] | None:
    """A benchmarks row from a benchmark report, or None if the gate stopped before its benchmark."""
    figures = report.gate.benchmark
    if figures is None or not device.hardware_class:
        log.info("benchmark telemetry from %s has no benchmark or the device no hardware class; "
                 "kept as telemetry only", device.id)
        return None
    return {
        "device_id": device.id, "hardware_class": device.hardware_class,
        "model": report.model.model, "version": report.model.version, "variant": report.model.variant,
        "p50_ms": figures.p50_ms, "p99_ms": figures.p99_ms, "throughput": figures.throughput_qps,
        "baseline_p99_ms": report.gate.previous_p99_ms if report.gate.paired else None,
        "ts": ts,
    }
