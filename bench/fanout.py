"""Benchmark 1, fan-out: time from a deploy (through the API) to every device SUCCEEDED.

Separate processes, as in production: a dedicated Mosquitto (its own port,
no persistence), ``fleetctl controller run`` (SQLite, or ``--database-url``),
and the fleet simulator (``python -m edgefleet.simulator``: N devices enrolled
through the API, each with its own MQTT connection, running the real agent
code on the digits model). The clock starts at the POST of the rollout (one
stage, 100%, no bake) and stops when the controller has recorded every device
SUCCEEDED. Anchor: AWS IoT Jobs rolls out to at most 1,000 devices per minute.
Same-run baseline: a bare broker fan-out of N retained messages to N
subscribers on the same Mosquitto and the same client machinery.

``--thin`` measures the controller instead of the simulator: thin devices
(simulator/thin.py) keep the wire protocol (own MQTT session, TUF refresh and
verified download from the controller, every event, heartbeats, counters) but
run no model and report a fixed benchmark. They are registered in bulk (rows
written to the controller's database, as an enrollment would leave them:
enrollment is setup, not the measurement) and spread over ``--processes``
simulator processes, each connecting from its own loopback address (one
address has ~28,000 ephemeral ports).

The table gives the CPU time per device update (from /proc, deploy to finish)
of the controller, the broker, the simulators and a local PostgreSQL server,
and how much of the machine's cores they used together: the wall time of a run
whose processes share these cores is bound by that sum. It checks that every
event the devices sent was stored (or its execution settled from the device's
report).

    python -m bench.fanout --devices 1000
    python -m bench.fanout --devices 10000 --thin --database-url postgresql://postgres@127.0.0.1:5432/fanout \
        --recreate-database
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx

from bench._common import DEFAULT_CACHE, table
from bench.ports import free_port

AWS_IOT_JOBS_PER_MIN = 1000.0  # the anchor: AWS IoT Jobs' maximum rollout rate
MODEL, VERSION = "digits", "1.0.0"
PREFIX = "fan"
PER_ADDRESS = 20000  # MQTT connections from one loopback address (it has ~28,000 ephemeral ports)


def bind_address(index: int) -> str:
    """The index-th loopback address connections come from: 127.0.0.2, 127.0.0.3, ..."""
    return f"127.0.0.{2 + index}"


@dataclass(frozen=True)
class FanoutResult:
    devices: int
    enroll_s: float          # setup: enrollment + first connect (not part of the figure)
    deploy_s: float          # deploy -> controller recorded every device SUCCEEDED
    device_side_s: float     # deploy -> the last device's SUCCEEDED event (simulator's view)
    broker_s: float          # bare fan-out of N retained messages to N subscribers
    rss_per_device_kb: float
    threads: int
    thin: bool = False
    processes: int = 1               # simulator processes
    controller_cpu_s: float = 0.0    # the controller process's CPU time (user+system), deploy to finish
    broker_cpu_s: float = 0.0        # Mosquitto's
    simulator_cpu_s: float = 0.0     # the simulator processes'
    database_cpu_s: float | None = None  # every process of the local PostgreSQL server (run nothing else on
    #                                      it meanwhile); None: SQLite, or a server on another machine
    events_sent: int = 0             # execution events the devices published for the rollout
    events_stored: int = 0           # of them, stored by the controller
    settled_from_report: int = 0     # executions settled from the device's report, not their events

    @property
    def per_minute(self) -> float:
        return self.devices / self.deploy_s * 60.0

    def cpu_ms_per_device(self, seconds: float) -> float:
        return seconds * 1000.0 / self.devices

    @property
    def cores_used(self) -> float:
        """CPU seconds of all the run's processes per second of the deploy."""
        total = self.controller_cpu_s + self.broker_cpu_s + self.simulator_cpu_s + (self.database_cpu_s or 0.0)
        return total / self.deploy_s


def raise_file_limit(wanted: int) -> None:
    """Let this process (and what it starts) hold ``wanted`` descriptors: one per MQTT connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))  # above the hard limit: root only
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {wanted} file descriptors needed, {soft} allowed (hard limit {hard}): {e}; "
                         "run as root or raise `ulimit -n`") from e


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> dict[int, float]:
    """CPU time so far of each process of a PostgreSQL server on this machine (backends, WAL writer,
    checkpointer, autovacuum); empty if none runs here."""
    seconds = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                if f.read().strip() == "postgres":
                    seconds[int(entry.name)] = cpu_seconds(int(entry.name))
        except OSError:  # it exited meanwhile
            continue
    return seconds


def local_postgres(database_url: str) -> bool:
    """Whether the run's database is a PostgreSQL server on this machine (its CPU is then measured)."""
    import sqlalchemy as sa

    if not database_url:
        return False
    url = sa.make_url(database_url)
    return url.get_backend_name() == "postgresql" and url.host in (None, "localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CpuSnapshot:
    controller: float
    broker: float
    simulators: float
    database: dict[int, float]

    @classmethod
    def take(cls, controller: int, broker: int, simulators: list[int], postgres: bool) -> CpuSnapshot:
        return cls(cpu_seconds(controller), cpu_seconds(broker), sum(cpu_seconds(pid) for pid in simulators),
                   postgres_cpu_seconds() if postgres else {})

    def database_since(self, before: CpuSnapshot) -> float | None:
        """The server's CPU between the two snapshots; a process started meanwhile counts from zero,
        one that exited meanwhile is not counted (the controller's pooled connections stay open)."""
        if not self.database:
            return None
        return sum(now - before.database.get(pid, 0.0) for pid, now in self.database.items())


@contextmanager
def process(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def mosquitto(work: Path, port: int) -> list[str]:
    conf = work / "mosquitto.conf"
    # No cap on the controller's queue: past it Mosquitto drops QoS 1 messages (1,000 by default),
    # and a 10,000-device fleet's heartbeats outran the controller by more than 10,000 here.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nset_tcp_nodelay true\nmax_connections -1\nconnection_messages false\n")
    return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]


T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})\n{tail}")
        try:
            value = check()
        except RuntimeError:  # the check saw a failure: waiting longer cannot help
            raise
        except Exception:  # noqa: BLE001 - not up yet
            value = None
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def broker_fanout(broker_url: str, devices: int, timeout: float) -> float:
    """Publish N retained QoS 1 messages, one per topic, to N subscribed clients on one network thread."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.common.mqtt import BrokerURL, ConnectionOptions, MqttConnection
    from edgefleet.simulator.network import NetworkLoop

    url = BrokerURL.parse(broker_url + "?protocol=5")
    received = threading.Semaphore(0)
    subscribed = threading.Semaphore(0)
    # connected first: paho's own loop uses select(), which fails on descriptors past 1024
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=paho.MQTTv5)
    publisher.connect(url.host, url.port)
    publisher.loop_start()
    loop = NetworkLoop()
    connections = []
    for i in range(devices):
        def on_connect(client: paho.Client, _present: bool, i: int = i) -> None:
            client.subscribe(f"bench/fanout/{i}", qos=1)
            subscribed.release()
        options = ConnectionOptions(client_id=f"bench-sub-{i}", persistent=False,
                                    bind_address=bind_address(i // PER_ADDRESS))
        conn = MqttConnection(url, options, on_connect=on_connect, on_message=lambda _m: received.release())
        connections.append(loop.connection(conn))
    loop.start()
    for connection in connections:
        connection.start()
    try:
        for _ in range(devices):
            if not subscribed.acquire(timeout=timeout):
                raise RuntimeError("bare fan-out: not every subscriber connected")
        time.sleep(1.0)  # SUBACKs in flight
        started = time.perf_counter()
        for i in range(devices):
            publisher.publish(f"bench/fanout/{i}", b'{"v":1,"generation":1}', qos=1, retain=True)
        for _ in range(devices):
            if not received.acquire(timeout=timeout):
                raise RuntimeError("bare fan-out: not every message arrived")
        elapsed = time.perf_counter() - started
        for i in range(devices):
            publisher.publish(f"bench/fanout/{i}", b"", qos=1, retain=True)
        return elapsed
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        for connection in connections:
            connection.disconnect()
        time.sleep(0.5)
        loop.stop()


def recreate_database(database_url: str) -> None:
    """Drop and create the PostgreSQL database the URL names (a scratch database for this run)."""
    import sqlalchemy as sa

    from edgefleet.controller.db.session import normalize_url

    url = sa.make_url(normalize_url(database_url))
    if url.get_backend_name() != "postgresql" or not url.database:
        raise SystemExit("error: --recreate-database needs a postgresql://USER@HOST/DATABASE URL")
    engine = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            name = connection.dialect.identifier_preparer.quote(url.database)
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        engine.dispose()


def fleet_home(work: Path, port: int, api_port: int, database_url: str) -> tuple[Path, str]:
    home = work / "home"
    env = {"EDGEFLEET_HOME": str(home)}
    fleetctl = str(Path(sys.executable).parent / "fleetctl")
    subprocess.run([fleetctl, "init"], check=True, capture_output=True, env={**os.environ, **env})
    settings = {"broker_url": f"mqtt://127.0.0.1:{port}", "api_port": api_port,
                "public_url": f"http://127.0.0.1:{api_port}"}
    if database_url:
        settings["database_url"] = database_url
    with open(home / "config.toml", "a") as f:
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    if database_url:
        subprocess.run([fleetctl, "db", "upgrade"], check=True, capture_output=True, env={**os.environ, **env})
    return home, (home / "operator-token").read_text().strip()


def publish_digits(home: Path, work: Path, cache: Path) -> None:
    """`fleetctl bundle build` + `publish` of the digits model (cpu-fp32 only: tiny, every class runs it)."""
    from bench import models

    digits = models.digits(cache)
    env = {**os.environ, "EDGEFLEET_HOME": str(home)}
    fleetctl = str(Path(sys.executable).parent / "fleetctl")
    bundle = work / "bundle"
    subprocess.run([fleetctl, "bundle", "build", str(digits.model), "--name", MODEL, "--version", VERSION,
                    "--variant", "cpu-fp32", "--calibration", str(digits.calibration_data), "--eval",
                    str(digits.eval_data), "-o", str(bundle)], check=True, capture_output=True, env=env)
    subprocess.run([fleetctl, "bundle", "publish", str(bundle)], check=True, capture_output=True, env=env)


def read_status(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def register_devices(database_url: str, devices: int, classes: str) -> None:
    """Thin runs: the device rows an enrollment would leave (labels, hardware), written in bulk."""
    import sqlalchemy as sa

    from edgefleet.controller.db.models import Device
    from edgefleet.controller.db.session import Database
    from edgefleet.simulator.fleet import FleetConfig, profile_for

    fleet = FleetConfig(devices=devices, classes=tuple(classes.split(",")), prefix=PREFIX)
    rows = [{"id": device, "labels": {"fleet": PREFIX}, "hardware": profile_for(cls).to_dict(),
             "hardware_class": cls} for device, cls in fleet.device_ids()]
    db = Database(database_url)
    try:
        with db.unit_of_work() as session:
            session.execute(sa.insert(Device), rows)
    finally:
        db.dispose()


def query_value(database_url: str, sql: str, **params: object) -> object:
    """The one value a query returns (a new connection each time: the database may have restarted)."""
    import sqlalchemy as sa

    from edgefleet.controller.db.session import Database

    db = Database(database_url)
    try:
        with db.reading() as session:
            return session.execute(sa.text(sql), params).scalar_one()
    finally:
        db.dispose()


def count_rows(database_url: str, sql: str, **params: object) -> int:
    return int(str(query_value(database_url, sql, **params)))


@dataclass
class Simulators:
    """The simulator processes of one run and their status files."""

    procs: list[subprocess.Popen]
    status: list[Path]
    logs: list[Path]

    def totals(self) -> dict:
        stats = [read_status(path) for path in self.status]
        states: dict[str, int] = {}
        for one in stats:
            for state, n in one.get("states", {}).items():
                states[state] = states.get(state, 0) + n
        return {"connected": sum(one.get("connected", 0) for one in stats), "states": states,
                "events_sent": sum(one.get("events_sent", 0) for one in stats),
                "rss_per_device_kb": max((one.get("rss_per_device_kb", 0.0) for one in stats), default=0.0),
                "threads": sum(one.get("threads", 0) for one in stats)}

    def check(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"a simulator exited ({proc.returncode})\n{log.read_text(errors='replace')[-3000:]}")


def start_simulators(stack: ExitStack, work: Path, env: dict[str, str], devices: int, classes: str, workers: int,
                     processes: int, common: list[str]) -> Simulators:
    """``processes`` simulators sharing the fleet: each its slice of device indexes and its own source address."""
    sims = Simulators([], [], [])
    share = -(-devices // processes)
    for i in range(processes):
        first, count = i * share, min(share, devices - i * share)
        if count <= 0:
            break
        status, log = work / f"fleet-{i}.json", work / f"simulator-{i}.log"
        sims.procs.append(stack.enter_context(process(
            [sys.executable, "-m", "edgefleet.simulator", *common, "--devices", str(count), "--first", str(first),
             "--classes", classes, "--prefix", PREFIX, "--workers", str(workers),
             "--state-root", str(work / "devices"), "--status-file", str(status), "--status-interval", "1",
             "--requests-per-s", "0"],  # fan-out alone: no inference traffic competing for the CPU
            log, env)))
        sims.status.append(status)
        sims.logs.append(log)
    return sims


def run(devices: int, classes: str, workers: int, database_url: str, timeout: float, cache: Path,
        work: Path, thin: bool = False, processes: int = 1) -> FanoutResult:
    from edgefleet.controller.cli.client import ApiClient
    from edgefleet.controller.rollout.spec import RolloutSpec

    raise_file_limit(devices + 4096)  # the bare fan-out's subscribers live in this process; children inherit it
    port = free_port()
    with ExitStack() as stack:
        broker_log = work / "mosquitto.log"
        broker = stack.enter_context(process(mosquitto(work, port), broker_log))
        broker_url = f"mqtt://127.0.0.1:{port}"
        wait_for("mosquitto", lambda: _connectable(port), 20)
        broker_s = broker_fanout(broker_url, devices, timeout)
        # chosen after the fan-out: its N client connections may have taken the port picked before
        api_port = free_port()
        controller_url = f"http://127.0.0.1:{api_port}"

        home, token = fleet_home(work, port, api_port, database_url)
        publish_digits(home, work, cache)
        env = {"EDGEFLEET_HOME": str(home)}
        controller_log = work / "controller.log"
        controller = stack.enter_context(process(
            [str(Path(sys.executable).parent / "fleetctl"), "controller", "run", "--log-level", "warning"],
            controller_log, env))
        client = ApiClient(controller_url, token)
        stack.callback(client.close)
        wait_for("the controller API", lambda: client.get("/healthz"), 60, controller, controller_log)

        began = time.monotonic()
        if thin:
            register_devices(database_url, devices, classes)
            root = work / "root.json"
            root.write_bytes(httpx.get(f"{controller_url}/repository/metadata/1.root.json").raise_for_status().content)
            common = ["--thin", "--trusted-root", str(root), "--broker", f"{broker_url}?protocol=5",
                      "--metadata-url", f"{controller_url}/repository/metadata/",
                      "--target-base-url", f"{controller_url}/repository/targets/"]
        else:
            common = ["--controller", controller_url, "--token", token]
        sims = start_simulators(stack, work, env, devices, classes, workers, processes, common)

        def connected() -> bool:
            sims.check()
            return sims.totals()["connected"] == devices

        wait_for("every simulated device to connect", connected, timeout, controller, controller_log)
        def online() -> int:  # a thin fleet of 50,000 is counted in the database, not listed through the API
            if thin:
                return count_rows(database_url, "SELECT count(*) FROM devices WHERE online")
            return sum(d["online"] for d in client.get("/v1/devices", selector=f"fleet={PREFIX}"))

        wait_for("the controller to see every device online", lambda: online() == devices,
                 timeout, controller, controller_log, interval=1.0)
        enroll_s = time.monotonic() - began

        spec = RolloutSpec(model=MODEL, version=VERSION, selector=f"fleet={PREFIX}", stages=(1.0,), bake_s=0.0,
                           bench_seconds=0.05, min_devices_per_stage=1, device_timeout_s=timeout)
        cpu = partial(CpuSnapshot.take, controller.pid, broker.pid, [p.pid for p in sims.procs],
                      local_postgres(database_url))
        cpu_before = cpu()
        started = time.monotonic()
        created = client.post("/v1/rollouts", {"manifest": spec.to_manifest(f"fanout-{devices}"), "dry_run": False})
        device_done: list[float] = []
        recorded: list[int] = [0]  # SUCCEEDED as the controller counts them, at the last look

        def finished() -> bool:
            sims.check()
            if not device_done and sims.totals()["states"].get("SUCCEEDED") == devices:
                device_done.append(time.monotonic())
            summary = next(r for r in client.get("/v1/rollouts") if r["id"] == created["id"])
            recorded[0] = summary["succeeded"]
            if summary["failed"]:
                raise RuntimeError(f"{summary['failed']} device(s) failed; see {sims.logs[0]}")
            return summary["succeeded"] == devices

        try:
            wait_for("every device SUCCEEDED", finished, timeout, controller, controller_log, interval=0.5)
        except RuntimeError as e:  # say how far it got: a partial run is still a measurement
            devices_side = (f"; every device had reported SUCCEEDED {device_done[0] - started:.0f} s after the deploy"
                            if device_done else "")
            raise RuntimeError(f"{e} (the controller had recorded {recorded[0]} of {devices} SUCCEEDED"
                               f"{devices_side})") from e
        deploy_s = time.monotonic() - started
        cpu_after = cpu()
        device_side = (device_done[0] if device_done else time.monotonic()) - started
        sent, stored, settled = event_accounting(database_url or f"sqlite:///{home / 'controller.db'}",
                                                 created["id"], devices, sims)
        totals = sims.totals()
    return FanoutResult(devices, enroll_s, deploy_s, device_side, broker_s, totals["rss_per_device_kb"],
                        totals["threads"], thin, len(sims.procs), cpu_after.controller - cpu_before.controller,
                        cpu_after.broker - cpu_before.broker, cpu_after.simulators - cpu_before.simulators,
                        cpu_after.database_since(cpu_before), sent, stored, settled)


def event_accounting(database_url: str, rollout_id: str, devices: int, sims: Simulators) -> tuple[int, int, int]:
    """(events the devices sent, events the controller stored, executions settled from a report).

    The controller may record the last SUCCEEDED before the simulators' status files (written
    once a second) count it, and before its last events are stored: wait for both, a while.
    """
    wait_for("the simulators to count every device SUCCEEDED",
             lambda: sims.totals()["states"].get("SUCCEEDED") == devices, 30)
    deadline = time.monotonic() + 30
    while True:
        sent = sims.totals()["events_sent"]
        stored = count_rows(database_url, "SELECT count(*) FROM events WHERE deployment = :rid", rid=rollout_id)
        if stored >= sent or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    settled = count_rows(database_url, "SELECT count(*) FROM executions WHERE rollout_id = :rid "
                         "AND detail LIKE 'settled from%'", rid=rollout_id)
    return sent, stored, settled


def done_with(work: Path, keep: bool) -> None:
    """Remove a finished run's work directory, or say where it is kept."""
    if keep:
        print(f"work dir: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


def _connectable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def render(results: list[FanoutResult]) -> str:
    rows = [(r.devices, f"{r.deploy_s:.1f}", f"{r.device_side_s:.1f}", f"{r.per_minute:,.0f}",
             f"{r.per_minute / AWS_IOT_JOBS_PER_MIN:.2f}", f"{r.broker_s:.2f}", f"{r.deploy_s / r.broker_s:.1f}",
             f"{r.cpu_ms_per_device(r.controller_cpu_s):.2f}", f"{r.cpu_ms_per_device(r.broker_cpu_s):.2f}",
             f"{r.cpu_ms_per_device(r.simulator_cpu_s):.2f}",
             "—" if r.database_cpu_s is None else f"{r.cpu_ms_per_device(r.database_cpu_s):.2f}",
             f"{r.cores_used:.2f} of {os.cpu_count()}",
             "thin (no model run, fixed benchmark)" if r.thin else "full (real model work)", r.processes,
             f"{r.events_stored:,} of {r.events_sent:,}; {r.settled_from_report} settled from report",
             f"{r.rss_per_device_kb:.0f}", r.threads, f"{r.enroll_s:.0f}")
            for r in results]
    return "\n".join([
        "Fan-out: deploy (API) -> every device SUCCEEDED, Mosquitto, digits model, simulated fleet", "",
        table(["devices", "deploy→all SUCCEEDED s", "last device event s", "devices/min",
               "vs AWS IoT Jobs (1,000/min)", "bare broker fan-out s", "deploy / bare broker",
               "controller CPU-ms/device", "broker CPU-ms/device", "simulator CPU-ms/device",
               "PostgreSQL CPU-ms/device", "cores used", "device kind", "simulator processes",
               "events stored", "simulator RSS/device KiB", "simulator threads", "setup s"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1000], help="Fleet sizes to run, e.g. 1000 10000.")
    parser.add_argument("--classes", default="x86_64,rpi-4")
    parser.add_argument("--workers", type=int, default=8, help="Simulator reconcile workers (per process).")
    parser.add_argument("--thin", action="store_true",
                        help="Thin devices: the wire protocol without the model work, to measure the controller.")
    parser.add_argument("--processes", type=int, default=0,
                        help="Simulator processes (default: 2 with --thin, else 1).")
    parser.add_argument("--database-url", default="", help="Controller database (default: SQLite in the temp home).")
    parser.add_argument("--recreate-database", action="store_true",
                        help="Drop and create the --database-url PostgreSQL database before each size (scratch).")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds allowed for each phase.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Model cache (bench/models.py).")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (logs) for a look.")
    args = parser.parse_args(argv)
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("error: mosquitto is not installed; install it (apt-get install -y mosquitto)", file=sys.stderr)
        return 1
    processes = args.processes or (2 if args.thin else 1)
    if args.thin and not args.database_url.startswith("postgresql"):
        print("error: --thin measures the controller as it runs at scale: give --database-url postgresql://...",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the ExitStack: no process left behind
    results = []
    for n in args.devices:
        work = Path(tempfile.mkdtemp(prefix=f"edgefleet-fanout-{n}-"))
        try:
            if args.recreate_database:
                recreate_database(args.database_url)
            results.append(run(n, args.classes, args.workers, args.database_url, args.timeout, args.cache, work,
                               args.thin, processes))
        except RuntimeError as e:
            print(f"error: fan-out with {n} devices: {e} (work dir kept: {work})", file=sys.stderr)
            progress = [read_status(path) for path in sorted(work.glob("fleet-*.json"))]
            if progress:  # how far it got, for a report of a run that did not finish
                print(f"last simulator status: {sum(p.get('connected', 0) for p in progress)} of {n} connected, "
                      f"device states {[p.get('states') for p in progress]}", file=sys.stderr)
            return 1
        done_with(work, args.keep)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
