"""Apply validated wire messages from devices to the database, idempotently and in bulk.

One call applies one batch in one transaction (all or nothing): the bridge hands
over whatever queued up, so a busy controller commits hundreds of messages at once.
A batch costs a fixed number of statements, whatever its size: the devices it names
are read as plain rows (and locked, in id order, on PostgreSQL), every decision is
made in memory, and the results go back as set-based writes (one multi-row INSERT
per table, one executemany UPDATE for the devices' liveness and marks, one for
executions). No ORM object is built per message.

Every rule below makes a redelivered or late message harmless:

- Status: an offline will with an older boot than the device's current one is ignored.
- Reported: a report older (boot, seq) than the stored one is ignored; the stored one, read again,
  may settle an execution but is not written again nor taken as a sign of life.
- Event: unique per (device, boot, seq), checked before insert and by the UNIQUE constraint.
- Telemetry: unique per (device, boot, seq); looked up only below the device's high-water mark.
Messages from devices that are not enrolled (or were removed meanwhile) are dropped
and counted. A device can only claim so much (``claims.refusal``): its boot moves
forward by at most MAX_BOOT_STEP, numbers fit the database, counters are non-negative
and bounded, and an event or a report moves an execution only for a generation the
device was sent.

An execution settles from its events, or from the device's report when the report
says the execution of that generation ended (the ``outcome`` of the model's
``ModelStatus``, sent once the device finished its own checks): a lost event then
costs nothing.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from psycopg.types.json import Json
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import (
    BenchmarkReport,
    DeviceMessage,
    Event,
    ExecutionState,
    ModelStatus,
    Reported,
    Status,
    Telemetry,
)

from .claims import refusal
from .db.models import (
    Benchmark,
    Device,
    EventRecord,
    Execution,
    Rollout,
    TelemetryRecord,
    utcnow,
)
from .db.session import Database

log = logging.getLogger(__name__)

DEVICES = cast(sa.Table, Device.__table__)
EXECUTIONS = cast(sa.Table, Execution.__table__)
TELEMETRY = cast(sa.Table, TelemetryRecord.__table__)


@dataclass
class IngestResult:
    applied: int = 0
    duplicates: int = 0    # QoS 1 redeliveries
    stale: int = 0         # older than what is stored (late will, old report, old attempt)
    unknown: int = 0       # device not enrolled, or removed
    refused: int = 0       # claims out of bounds (boot jump, counters, a generation never sent)
    settled: int = 0       # executions settled from a report (their terminal event had not arrived)

    def __iadd__(self, other: IngestResult) -> IngestResult:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.stale += other.stale
        self.unknown += other.unknown
        self.refused += other.refused
        self.settled += other.settled
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


@dataclass
class DeviceState:
    """The columns ingest reads and writes of one device, as a plain row."""

    id: str
    boot: int
    online: bool
    last_seen: datetime | None
    hardware_class: str | None
    desired_generation: int
    last_event_boot: int
    last_event_seq: int
    last_telemetry_boot: int
    last_telemetry_seq: int
    report_mark: tuple[int, int]             # (boot, seq) of the stored report; (-1, -1): none
    reported: dict[str, Any] | None = None   # a newer report to store
    hardware: dict[str, Any] | None = None   # its hardware profile, when readable
    changed: bool = False                    # liveness or marks to write back

    @property
    def telemetry_mark(self) -> tuple[int, int]:
        return self.last_telemetry_boot, self.last_telemetry_seq


_STATE_COLUMNS = (
    Device.id, Device.boot, Device.online, Device.last_seen, Device.hardware_class, Device.desired_generation,
    Device.last_event_boot, Device.last_event_seq, Device.last_telemetry_boot, Device.last_telemetry_seq,
    Device.reported["boot"].as_integer(), Device.reported["seq"].as_integer(),
)


@dataclass
class ExecutionRow:
    """An execution as ingest needs it, and whether this batch moved it."""

    id: int
    rollout_id: str
    device_id: str
    generation: int
    state: ExecutionState
    detail: str
    model: str          # the rollout's
    version: str
    variant: str | None
    moved: bool = False


class _Batch:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.postgres = session.get_bind().dialect.name == "postgresql"
        self.result = IngestResult()
        self.now = utcnow()
        self.telemetry_rows: list[dict[str, Any]] = []
        self.benchmark_rows: list[dict[str, Any]] = []
        self.event_rows: list[dict[str, Any]] = []
        self.by_rollout: dict[tuple[str, str], ExecutionRow] = {}
        self.by_generation: dict[tuple[str, int], ExecutionRow] = {}
        self.seen_events: set[tuple[str, int, int]] = set()
        self.seen_telemetry: set[tuple[str, int, int]] = set()

    def run(self, messages: Sequence[DeviceMessage]) -> IngestResult:
        devices = self._devices({m.device for m in messages})
        events = [m for m in messages if isinstance(m, Event) and m.device in devices]
        reports = [m for m in messages if isinstance(m, Reported) and m.device in devices
                   and any(status.outcome for status in m.models)]
        self.seen_events = self._stored(EventRecord, events)
        self._executions(events, reports)
        self.seen_telemetry = self._stored(TelemetryRecord, [
            m for m in messages if isinstance(m, Telemetry) and m.device in devices
            and (m.boot, m.seq) <= devices[m.device].telemetry_mark
        ])
        for message in messages:
            device = devices.get(message.device)
            if device is None:
                log.warning("dropped %s from unknown device %r (not enrolled)",
                            type(message).__name__, message.device)
                self.result.unknown += 1
            elif (why := refusal(device.boot, message)) is not None:
                log.warning("dropped %s from %s: %s", type(message).__name__, device.id, why)
                self.result.refused += 1
            elif isinstance(message, Status):
                self._status(device, message)
            elif isinstance(message, Reported):
                self._reported(device, message)
            elif isinstance(message, Event):
                self._event(device, message)
            elif isinstance(message, Telemetry):
                self._telemetry(device, message)
            else:
                raise TypeError(f"ingest got a {type(message).__name__}, which devices do not send")
        self._write(devices.values())
        return self.result

    # --- reads: one statement each ------------------------------------------------

    def _devices(self, ids: set[str]) -> dict[str, DeviceState]:
        query = sa.select(*_STATE_COLUMNS).where(_any(DEVICES.c.id, ids, self.postgres)).order_by(Device.id)
        if self.postgres:
            # Replicas: one batch per device at a time, locked in id order like every writer of devices.
            # NO KEY UPDATE: inserts referencing the device (events, executions) need not wait for it.
            query = query.with_for_update(key_share=True)
        states = {}
        for (device, boot, online, seen, cls, generation, event_boot, event_seq, telemetry_boot, telemetry_seq,
             report_boot, report_seq) in self.session.execute(query):
            states[device] = DeviceState(device, boot, online, seen, cls, generation, event_boot, event_seq,
                                         telemetry_boot, telemetry_seq, (_mark(report_boot), _mark(report_seq)))
        return states

    def _executions(self, events: list[Event], reports: list[Reported]) -> None:
        """The executions these events name by (rollout, device), and those these reports
        name by (device, generation), in one query."""
        named = [e for e in events if e.deployment]
        if not named and not reports:
            return
        by_rollout = sa.and_(Execution.rollout_id.in_({e.deployment for e in named}),
                             Execution.device_id.in_({e.device for e in named}))
        ended = {status.generation for r in reports for status in r.models if status.outcome}
        by_generation = sa.and_(Execution.device_id.in_({r.device for r in reports}),
                                Execution.generation.in_(ended))
        query = (
            sa.select(Execution.id, Execution.rollout_id, Execution.device_id, Execution.generation,
                      Execution.state, Execution.detail, Rollout.model, Rollout.version, Execution.variant)
            .join(Rollout, Rollout.id == Execution.rollout_id)
            .where(sa.or_(by_rollout, by_generation))
        )
        for row in self.session.execute(query):
            execution = ExecutionRow(*row)
            self.by_rollout[(execution.rollout_id, execution.device_id)] = execution
            if execution.generation:
                self.by_generation[(execution.device_id, execution.generation)] = execution

    def _stored(self, table: type[EventRecord] | type[TelemetryRecord], messages: list) -> set[tuple[str, int, int]]:
        """Which of these (device, boot, seq) are already in the table."""
        if not messages:
            return set()
        query = sa.select(table.device_id, table.boot, table.seq).where(
            table.device_id.in_({m.device for m in messages}),
            table.seq.in_({m.seq for m in messages}),
        )
        return {(d, b, s) for d, b, s in self.session.execute(query)}

    # --- one handler per message type (in memory) ------------------------------------

    def _seen(self, device: DeviceState, boot: int) -> None:
        """A message from the device's current (or a newer) boot: it is alive."""
        if boot >= device.boot:
            device.boot, device.online, device.last_seen, device.changed = boot, True, self.now, True

    def _status(self, device: DeviceState, message: Status) -> None:
        if message.boot < device.boot:
            self.result.stale += 1  # a will from an earlier session, delivered late
            return
        device.boot, device.online, device.changed = message.boot, message.online, True
        if message.online:
            device.last_seen = self.now
        self.result.applied += 1

    def _reported(self, device: DeviceState, message: Reported) -> None:
        mark = (message.boot, message.seq)
        if mark < device.report_mark:
            self.result.stale += 1
            return
        if mark == device.report_mark:
            # The stored report again: a QoS 1 redelivery, or the leader's sweep re-reading a silent
            # (often offline) device's retained report. Nothing to write and no sign of life.
            for status in message.models:
                self._settle(device, status)
            self.result.duplicates += 1
            return
        device.report_mark, device.reported = mark, message.to_dict()
        if message.hardware is not None:
            try:
                profile = HardwareProfile.from_dict(message.hardware)
            except (TypeError, ValueError, AttributeError) as e:
                log.warning("device %s reported an unreadable hardware profile: %s", device.id, e)
            else:
                device.hardware, device.hardware_class = profile.to_dict(), profile.hardware_class
        for status in message.models:
            self._settle(device, status)
        self._seen(device, message.boot)
        self.result.applied += 1

    def _settle(self, device: DeviceState, status: ModelStatus) -> None:
        """Settle the execution of one model's reported generation from its outcome."""
        if status.outcome is None or not 0 < status.generation <= device.desired_generation:
            return  # still running, or a generation never sent to this device: nothing to settle
        execution = self.by_generation.get((device.id, status.generation))
        if execution is None or execution.state.terminal:
            return
        if status.model != execution.model:  # generations are per device: another model's execution
            log.warning("device %s reports generation %d for %s, which was sent for %s: not settled",
                        device.id, status.generation, status.model, execution.model)
            return
        active = status.active
        if status.outcome is ExecutionState.SUCCEEDED and (
            active is None or (active.model, active.version, active.variant)
            != (execution.model, execution.version, execution.variant)
        ):
            log.warning("device %s reports generation %d SUCCEEDED but runs %s, not %s %s %s: not settled",
                        device.id, status.generation, active, execution.model, execution.version,
                        execution.variant)
            return
        execution.state, execution.moved = status.outcome, True
        execution.detail = f"settled from the device's report (generation {status.generation})"
        self.result.settled += 1

    def _event(self, device: DeviceState, message: Event) -> None:
        execution = self.by_rollout.get((message.deployment, device.id)) if message.deployment else None
        if execution is not None and message.generation > device.desired_generation:
            log.warning("dropped Event from %s: generation %d of %s was never sent to it (latest sent: %d)",
                        device.id, message.generation, message.deployment, device.desired_generation)
            self.result.refused += 1
            return
        key = (device.id, message.boot, message.seq)
        if key in self.seen_events:
            self.result.duplicates += 1
            return
        self.seen_events.add(key)
        self.event_rows.append({
            "device_id": device.id, "boot": message.boot, "seq": message.seq,
            "generation": message.generation, "deployment": message.deployment, "state": message.state.value,
            "model": message.model, "version": message.version, "variant": message.variant,
            "detail": message.detail, "data": message.gate.to_dict() if message.gate else {},
            "ts": message_time(message.ts),
        })
        if (message.boot, message.seq) > (device.last_event_boot, device.last_event_seq):
            device.last_event_boot, device.last_event_seq, device.changed = message.boot, message.seq, True
        if execution is not None:
            _move(execution, message)
        self._seen(device, message.boot)
        self.result.applied += 1

    def _telemetry(self, device: DeviceState, message: Telemetry) -> None:
        # Above the high-water mark is new (the common case, no lookup); below it only
        # if not stored yet (a replica or a reconnect delivered it out of order).
        key = (device.id, message.boot, message.seq)
        if key in self.seen_telemetry:
            self.result.duplicates += 1
            return
        self.seen_telemetry.add(key)
        if (message.boot, message.seq) > device.telemetry_mark:
            device.last_telemetry_boot, device.last_telemetry_seq, device.changed = message.boot, message.seq, True
        ts = message_time(message.ts)
        self.telemetry_rows.append({
            "device_id": device.id, "kind": message.kind.value, "boot": message.boot,
            "seq": message.seq, "data": message.payload.to_dict(), "ts": ts,
        })
        if message.benchmark is not None:
            row = benchmark_row(device.id, device.hardware_class, message.benchmark, ts)
            if row is not None:
                self.benchmark_rows.append(row)
        self._seen(device, message.boot)
        self.result.applied += 1

    # --- writes: set-based ---------------------------------------------------------------

    def _write(self, devices: Iterable[DeviceState]) -> None:
        if self.telemetry_rows:
            if self.postgres:
                copy_rows(self.session, TELEMETRY, self.telemetry_rows)
            else:
                self.session.execute(sa.insert(TELEMETRY), self.telemetry_rows)
        if self.benchmark_rows:
            self.session.execute(sa.insert(cast(sa.Table, Benchmark.__table__)), self.benchmark_rows)
        if self.event_rows:
            self.session.execute(self._insert_ignoring_duplicates(), self.event_rows)
        ordered = sorted(devices, key=lambda d: d.id)  # in id order: the order every writer locks devices in
        changed = [d for d in ordered if d.changed]
        if changed:
            self.session.execute(*liveness_update(changed, self.postgres))
        reports = [d for d in ordered if d.reported is not None]
        for columns, group in (((), [d for d in reports if d.hardware is None]),
                               (("hardware", "hardware_class"), [d for d in reports if d.hardware is not None])):
            if group:  # an executemany: one round trip on psycopg (pipelined)
                self.session.execute(
                    sa.update(DEVICES).where(DEVICES.c.id == sa.bindparam("b_id"))
                    .values({name: sa.bindparam(f"b_{name}") for name in ("reported", *columns)}),
                    [{"b_id": d.id, **{f"b_{name}": getattr(d, name) for name in ("reported", *columns)}}
                     for d in group])
        moved = sorted((x for x in self.by_rollout.values() if x.moved), key=lambda x: x.id)
        if moved:
            self.session.execute(
                sa.update(EXECUTIONS).where(EXECUTIONS.c.id == sa.bindparam("b_id"))
                .values(state=sa.bindparam("b_state"), detail=sa.bindparam("b_detail")),
                [{"b_id": x.id, "b_state": x.state, "b_detail": x.detail} for x in moved],
            )

    def _insert_ignoring_duplicates(self) -> sa.Insert:
        """A replica that inserted the same event first wins; ours is a no-op."""
        insert = postgresql.insert if self.postgres else sqlite.insert
        table = cast(sa.Table, EventRecord.__table__)
        return insert(table).on_conflict_do_nothing(index_elements=["device_id", "boot", "seq"])


_LIVENESS = ("boot", "online", "last_seen", "last_event_boot", "last_event_seq", "last_telemetry_boot",
             "last_telemetry_seq")
# One fixed statement whatever the batch size (compiled and parsed once): the columns travel as arrays.
_LIVENESS_UPDATE = sa.text(
    "UPDATE devices SET boot = g.boot, online = g.online, last_seen = g.last_seen, "
    "last_event_boot = g.last_event_boot, last_event_seq = g.last_event_seq, "
    "last_telemetry_boot = g.last_telemetry_boot, last_telemetry_seq = g.last_telemetry_seq "
    "FROM unnest(CAST(:id AS varchar[]), CAST(:boot AS integer[]), CAST(:online AS boolean[]), "
    "CAST(:last_seen AS timestamptz[]), CAST(:last_event_boot AS integer[]), CAST(:last_event_seq AS integer[]), "
    "CAST(:last_telemetry_boot AS integer[]), CAST(:last_telemetry_seq AS integer[])) "
    "AS g(id, boot, online, last_seen, last_event_boot, last_event_seq, last_telemetry_boot, last_telemetry_seq) "
    "WHERE devices.id = g.id"
)


def liveness_update(changed: list[DeviceState], postgres: bool) -> tuple[sa.Executable, Any]:
    """One statement writing the liveness columns and marks of these devices.

    PostgreSQL: one ``UPDATE … FROM unnest(arrays)``, one round trip for the batch. SQLite runs
    in-process, where an executemany costs no round trips.
    """
    if postgres:
        return _LIVENESS_UPDATE, {"id": [d.id for d in changed],
                                  **{name: [getattr(d, name) for d in changed] for name in _LIVENESS}}
    rows = [{"b_id": d.id, **{f"b_{name}": getattr(d, name) for name in _LIVENESS}} for d in changed]
    return (sa.update(DEVICES).where(DEVICES.c.id == sa.bindparam("b_id"))
            .values({name: sa.bindparam(f"b_{name}") for name in _LIVENESS}), rows)


def _any(column: sa.ColumnElement[str], values: set[str], postgres: bool) -> sa.ColumnElement[bool]:
    """``column IN values``; on PostgreSQL as ``= ANY(array)``: one parameter, so one statement text
    for every batch (an IN list of 500 is 500 parameters, compiled and parsed anew each time)."""
    if postgres:
        return column == sa.any_(sa.cast(sa.bindparam("ids", sorted(values)), postgresql.ARRAY(sa.String)))
    return column.in_(sorted(values))


def copy_rows(session: Session, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows with PostgreSQL's COPY in the session's transaction: the cheapest bulk insert
    (an INSERT per row, or a multi-row INSERT that psycopg parses anew each time, costs several
    times more per row on the controller's CPU)."""
    columns = list(rows[0])
    json_columns = {name for name in columns if isinstance(table.c[name].type, sa.JSON)}
    driver = session.connection().connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(  # type: ignore[union-attr]
        f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row([Json(row[name]) if name in json_columns else row[name] for name in columns])


def _mark(value: int | None) -> int:
    return -1 if value is None else value


def _move(execution: ExecutionRow, message: Event) -> None:
    """Move the execution the event names, unless the event is from an earlier attempt."""
    if message.generation < execution.generation:
        return
    if execution.state.terminal and message.generation == execution.generation:
        return  # a late, reordered event cannot reopen a finished attempt
    execution.state, execution.detail, execution.moved = message.state, message.detail, True


def benchmark_row(device: str, hardware_class: str | None, report: BenchmarkReport,
                  ts: datetime) -> dict[str, Any] | None:
    """A benchmarks row from a benchmark report, or None if the gate stopped before its benchmark."""
    figures = report.gate.benchmark
    if figures is None or not hardware_class:
        log.info("benchmark telemetry from %s has no benchmark or the device no hardware class; "
                 "kept as telemetry only", device)
        return None
    return {
        "device_id": device, "hardware_class": hardware_class,
        "model": report.model.model, "version": report.model.version, "variant": report.model.variant,
        "p50_ms": figures.p50_ms, "p99_ms": figures.p99_ms, "throughput": figures.throughput_qps,
        "baseline_p99_ms": report.gate.previous_p99_ms if report.gate.paired else None,
        "ts": ts,
    }
