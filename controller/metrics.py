"""The controller's Prometheus metrics, served as ``GET /metrics`` (any operator token).

Fleet-wide figures (devices, executions, rollouts, gate values, the publish outbox) are
read from the database at each scrape, so every replica reports the same values; the
ingest figures are this process's own MQTT bridge (sum them over replicas).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edgefleet.common.protocol import ExecutionState

from .broker import BridgeStats
from .db.models import Device, Execution, GateResult, Rollout
from .db.session import Database
from .rollout.states import RolloutState

CONTENT_TYPE = CONTENT_TYPE_LATEST
_OPEN = (RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED)


class MessageSource(Protocol):
    """What the metrics read of the MQTT bridge (``broker.Bridge``)."""

    stats: BridgeStats

    @property
    def backlog(self) -> int: ...


class FleetCollector(Collector):
    """Devices, rollouts, executions, gates and the outbox, from the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily("edgefleet_controller_devices", "Enrolled devices by hardware class and status.",
                                    labels=("hardware_class", "status"))
        rollouts = GaugeMetricFamily("edgefleet_controller_rollouts", "Rollouts by state.", labels=("state",))
        executions = GaugeMetricFamily(
            "edgefleet_controller_executions", "Update executions of unfinished rollouts, by rollout and state.",
            labels=("rollout", "state"))
        gates = GaugeMetricFamily(
            "edgefleet_controller_gate_value",
            "Latest value of each gate of an unfinished rollout (stage is 1-based; NaN: no data).",
            labels=("rollout", "stage", "hardware_class", "gate"))
        thresholds = GaugeMetricFamily(
            "edgefleet_controller_gate_threshold", "The limit each gate value is held to.",
            labels=("rollout", "stage", "hardware_class", "gate"))
        outbox = GaugeMetricFamily(
            "edgefleet_controller_outbox_depth", "Devices whose latest desired state the broker has not acknowledged.")
        with self.db.reading() as session:
            for cls, online, n in session.execute(
                sa.select(Device.hardware_class, Device.online, sa.func.count()).group_by(
                    Device.hardware_class, Device.online)):
                devices.add_metric((cls or "unknown", "online" if online else "offline"), n)
            by_state = dict(session.execute(sa.select(Rollout.state, sa.func.count()).group_by(Rollout.state)).all())
            for state in RolloutState:
                rollouts.add_metric((state.value,), by_state.get(state, 0))
            for rollout_id, exec_state, n in session.execute(
                sa.select(Execution.rollout_id, Execution.state, sa.func.count())
                .join(Rollout, Rollout.id == Execution.rollout_id).where(Rollout.state.in_(_OPEN))
                .group_by(Execution.rollout_id, Execution.state)):
                executions.add_metric((rollout_id, ExecutionState(exec_state).value), n)
            latest: dict[tuple[str, str, str, str], GateResult] = {}
            for gate in session.scalars(
                sa.select(GateResult).join(Rollout, Rollout.id == GateResult.rollout_id)
                .where(Rollout.state.in_(_OPEN)).order_by(GateResult.id)):
                latest[(gate.rollout_id, str(gate.stage + 1), gate.hardware_class or "all", gate.gate)] = gate
            for labels, gate in sorted(latest.items()):
                gates.add_metric(labels, float("nan") if gate.value is None else gate.value)
                if gate.threshold is not None:
                    thresholds.add_metric(labels, gate.threshold)
            outbox.add_metric((), session.scalar(
                sa.select(sa.func.count()).select_from(Device)
                .where(Device.desired_generation > Device.desired_sent_generation)) or 0)
        yield from (devices, rollouts, executions, gates, thresholds, outbox)


class IngestCollector(Collector):
    """Device messages through this controller's MQTT bridge."""

    def __init__(self, bridge: MessageSource) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        stats = self.bridge.stats
        result = stats.ingested
        received = CounterMetricFamily("edgefleet_controller_mqtt_messages_received",
                                       "Device messages received from the broker.")
        received.add_metric((), stats.received)
        ingested = CounterMetricFamily(
            "edgefleet_controller_ingest_messages",
            "Device messages committed to the database, by result (applied, or why not).", labels=("result",))
        for name, n in (("applied", result.applied), ("duplicate", result.duplicates), ("stale", result.stale),
                        ("unknown_device", result.unknown), ("refused", result.refused), ("dropped", stats.dropped)):
            ingested.add_metric((name,), n)
        backlog = GaugeMetricFamily("edgefleet_controller_ingest_backlog",
                                    "Device messages received and not yet committed.")
        backlog.add_metric((), self.bridge.backlog)
        lag = GaugeMetricFamily(
            "edgefleet_controller_ingest_lag_seconds",
            "From receipt to commit, for the oldest message of the latest committed batch.")
        lag.add_metric((), stats.lag_s)
        yield from (received, ingested, backlog, lag)


def registry(db: Database, bridge: MessageSource | None = None) -> CollectorRegistry:
    found = CollectorRegistry()
    found.register(FleetCollector(db))
    if bridge is not None:
        found.register(IngestCollector(bridge))
    return found


def render(found: CollectorRegistry) -> bytes:
    return generate_latest(found)
