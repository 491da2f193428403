"""Replicas: two ``fleetctl controller run`` on one PostgreSQL and one Mosquitto, through failures.

Everything real and private to the run: a PostgreSQL cluster of its own (initdb into a temp
dir, its own port; started as the ``postgres`` user when run as root, which PostgreSQL
requires), a Mosquitto of its own with persistence, two controller processes on one fleet
home (each its own API port and MQTT client id, one MQTT 5 share group, the scheduler
led by whichever holds the database leader lock), and thin simulated devices
(simulator/thin.py) in two processes. Replica A starts first and leads; the devices fetch
from replica B (a load balancer's job in production).

The rollout goes in three stages; ``--chaos`` picks what happens during it:
``kill`` SIGKILLs the leader while stage 1 runs (the time until B holds the lock is the
hand-over), ``broker`` restarts Mosquitto when stage 2 begins, ``database`` restarts
PostgreSQL when stage 3 begins. Afterwards: every device has exactly one execution, all
SUCCEEDED, and every event a device sent is stored (or its execution settled from the
device's report).

    python -m bench.replicas --devices 2000 --chaos kill,broker,database
    python -m bench.replicas --devices 10000 --replicas 1 2          # two replicas vs one, no chaos
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

from bench._common import DEFAULT_CACHE, table
from bench.fanout import (
    MODEL,
    PREFIX,
    VERSION,
    Simulators,
    _connectable,
    count_rows,
    done_with,
    event_accounting,
    fleet_home,
    process,
    publish_digits,
    query_value,
    raise_file_limit,
    register_devices,
    start_simulators,
    wait_for,
)
from bench.ports import free_port

CHAOS = ("kill", "broker", "database")
STAGES = (0.3, 0.6, 1.0)


@dataclass(frozen=True)
class ReplicaResult:
    devices: int
    replicas: int
    chaos: tuple[str, ...]
    deploy_s: float
    executions: int
    succeeded: int
    duplicated: int          # devices with more than one execution
    events_sent: int
    events_stored: int
    settled_from_report: int
    handover_s: float | None  # SIGKILL of the leader -> the other replica holds the lock

    @property
    def ok(self) -> bool:
        """Every device exactly one execution, all SUCCEEDED (its events or its report settled it)."""
        return self.executions == self.succeeded == self.devices and not self.duplicated


class Postgres:
    """A PostgreSQL cluster of its own in ``root``, on ``port``."""

    def __init__(self, root: Path, port: int) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins:
            raise SystemExit("error: PostgreSQL server binaries not found under /usr/lib/postgresql "
                             "(apt-get install postgresql)")
        self.bin, self.root, self.port = bins[-1], root, port
        self.data, self.log = root / "data", root / "postgres.log"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/edgefleet"

    def _run(self, *command: str) -> None:
        # PostgreSQL refuses to run as root: as root (CI), run it as the postgres user.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "edgefleet")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=200 "
                   "-c fsync=off -c full_page_writes=off")  # a scratch cluster: speed over crash safety
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def restart(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.start()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")


def mosquitto_persistent(work: Path, port: int) -> list[str]:
    """Mosquitto with persistence: sessions and queued messages survive its restart."""
    store = work / "mosquitto-data"
    store.mkdir(exist_ok=True)
    if os.geteuid() == 0:  # started as root, Mosquitto drops to its own user, which must write here
        shutil.chown(store, "mosquitto")
    conf = work / "mosquitto-persistent.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {store}/\nmax_queued_messages 0\nset_tcp_nodelay true\n"
                    "max_connections -1\nconnection_messages false\n")
    return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]


@contextmanager
def postgres(root: Path) -> Iterator[Postgres]:
    cluster = Postgres(root, free_port())
    cluster.init()
    try:
        yield cluster
    finally:
        cluster.stop()


def leader_pid(database_url: str) -> int | None:
    """The process id in the scheduler lock's holder (HOST-PID-TOKEN), if its lease is current."""
    try:
        holder = query_value(database_url, "SELECT coalesce(max(holder), '') FROM leader_lock "
                             "WHERE name = 'scheduler' AND expires_at > now()")
    except Exception:  # noqa: BLE001 - the database is being restarted: no answer yet
        return None
    parts = str(holder).rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def run(devices: int, replicas: int, chaos: tuple[str, ...], timeout: float, cache: Path, work: Path,
        workers: int, silent_s: float) -> ReplicaResult:
    from edgefleet.controller.cli.client import ApiClient
    from edgefleet.controller.rollout.spec import RolloutSpec

    raise_file_limit(devices + 4096)
    with ExitStack() as stack:
        cluster = stack.enter_context(postgres(work / "pg"))
        port = free_port()
        broker_command, broker_log = mosquitto_persistent(work, port), work / "mosquitto.log"
        brokers = [stack.enter_context(process(broker_command, broker_log))]
        wait_for("mosquitto", lambda: _connectable(port), 20)
        api_ports = [free_port() for _ in range(replicas)]
        home, token = fleet_home(work, port, api_ports[0], cluster.url)
        with open(home / "config.toml", "a") as f:
            f.write(f'share_group = "edgefleet-bench"\nscheduler_interval_s = 1.0\nreport_reread_s = {silent_s}\n')
        publish_digits(home, work, cache)
        fleetctl = str(Path(sys.executable).parent / "fleetctl")
        controllers: list[subprocess.Popen] = []

        def replica(i: int) -> subprocess.Popen:
            env = {"EDGEFLEET_HOME": str(home), "EDGEFLEET_API_PORT": str(api_ports[i]),
                   "EDGEFLEET_MQTT_CLIENT_ID": f"edgefleet-bench-replica-{i}"}
            return stack.enter_context(process([fleetctl, "controller", "run", "--log-level", "warning"],
                                               work / f"controller-{i}.log", env))

        for i, api_port in enumerate(api_ports):
            log = work / f"controller-{i}.log"
            controllers.append(replica(i))
            client = ApiClient(f"http://127.0.0.1:{api_port}", token)
            stack.callback(client.close)
            wait_for(f"controller {i}", partial(client.get, "/healthz"), 60, controllers[-1], log)
            if i == 0:  # A leads before B starts: the leader is the one to kill
                wait_for("replica A to lead", lambda: leader_pid(cluster.url) == controllers[0].pid, 30)
        serving = f"http://127.0.0.1:{api_ports[-1]}"   # the devices' (and the operator's) replica
        register_devices(cluster.url, devices, "x86_64,rpi-4")
        root = work / "root.json"
        root.write_bytes(httpx.get(f"{serving}/repository/metadata/1.root.json").raise_for_status().content)
        common = ["--thin", "--trusted-root", str(root), "--broker", f"mqtt://127.0.0.1:{port}?protocol=5",
                  "--metadata-url", f"{serving}/repository/metadata/", "--target-base-url",
                  f"{serving}/repository/targets/", "--heartbeat", "10"]
        sims: Simulators = start_simulators(stack, work, {"EDGEFLEET_HOME": str(home)}, devices,
                                            "x86_64,rpi-4", workers, 2, common)

        def connected() -> bool:
            sims.check()
            return sims.totals()["connected"] == devices

        wait_for("every device to connect", connected, timeout)
        wait_for("the controllers to see every device online",
                 lambda: count_rows(cluster.url, "SELECT count(*) FROM devices WHERE online") == devices, timeout)
        operator = ApiClient(serving, token)
        stack.callback(operator.close)
        spec = RolloutSpec(model=MODEL, version=VERSION, selector=f"fleet={PREFIX}", stages=STAGES, bake_s=0.0,
                           min_devices_per_stage=1, device_timeout_s=timeout)
        started = time.monotonic()
        rollout_id = operator.post("/v1/rollouts", {"manifest": spec.to_manifest(f"replicas-{devices}"),
                                                    "dry_run": False})["id"]
        pending = [c for c in CHAOS if c in chaos]
        handover: list[float] = []

        def step() -> bool:
            sims.check()
            try:
                summary = next(r for r in operator.get("/v1/rollouts") if r["id"] == rollout_id)
            except Exception:  # noqa: BLE001 - the database is being restarted: look again
                return False
            if pending and summary["stage"] >= CHAOS.index(pending[0]):
                act(pending.pop(0))
            return summary["succeeded"] == devices and not pending

        def act(what: str) -> None:
            if what == "kill":
                killed = time.monotonic()
                controllers[0].send_signal(signal.SIGKILL)
                wait_for("replica B to take the lead", lambda: leader_pid(cluster.url) == controllers[-1].pid,
                         120, interval=0.1)
                handover.append(time.monotonic() - killed)
            elif what == "broker":
                brokers[0].send_signal(signal.SIGTERM)  # a clean stop writes the persistence file
                brokers[0].wait(30)
                brokers[0] = stack.enter_context(process(broker_command, broker_log))
            else:
                cluster.restart()

        wait_for("every device SUCCEEDED", step, timeout, interval=0.5)
        deploy_s = time.monotonic() - started
        if handover:  # back again, the killed replica takes what the broker kept in its session: nothing is lost
            controllers[0] = replica(0)
        sent, stored, settled = event_accounting(cluster.url, rollout_id, devices, sims)
        executions = count_rows(cluster.url, "SELECT count(*) FROM executions WHERE rollout_id = :r", r=rollout_id)
        succeeded = count_rows(cluster.url, "SELECT count(*) FROM executions WHERE rollout_id = :r "
                               "AND state = 'SUCCEEDED'", r=rollout_id)
        duplicated = count_rows(cluster.url, "SELECT count(*) FROM (SELECT device_id FROM executions "
                                "WHERE rollout_id = :r GROUP BY device_id HAVING count(*) > 1) d", r=rollout_id)
    return ReplicaResult(devices, replicas, chaos, deploy_s, executions, succeeded, duplicated, sent, stored, settled,
                         handover[0] if handover else None)


def render(results: list[ReplicaResult]) -> str:
    rows = [(r.devices, r.replicas, ", ".join(r.chaos) or "none", f"{r.deploy_s:.1f}",
             f"{r.devices / r.deploy_s * 60:,.0f}", f"{r.executions:,}", f"{r.succeeded:,}", r.duplicated,
             f"{r.events_stored:,} of {r.events_sent:,}", r.settled_from_report,
             "—" if r.handover_s is None else f"{r.handover_s:.1f}")
            for r in results]
    return "\n".join([
        "Replicas: deploy -> every device SUCCEEDED, own PostgreSQL and Mosquitto (persistent), thin devices", "",
        table(["devices", "replicas", "during the rollout", "deploy→all SUCCEEDED s", "devices/min", "executions",
               "SUCCEEDED", "devices with >1 execution", "events stored", "settled from report",
               "leader hand-over s"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2], help="Run once per count, e.g. 1 2.")
    parser.add_argument("--chaos", default="", help=f"Comma-separated, during the rollout: {', '.join(CHAOS)}.")
    parser.add_argument("--workers", type=int, default=64, help="Simulator reconcile workers (per process).")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds allowed for each phase.")
    parser.add_argument("--silent-s", type=float, default=30.0,
                        help="The controllers' report_reread_s: a silent execution's report is read again after it.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Model cache (bench/models.py).")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (logs) for a look.")
    args = parser.parse_args(argv)
    chaos = tuple(c for c in args.chaos.split(",") if c)
    if unknown := set(chaos) - set(CHAOS):
        parser.error(f"unknown --chaos {', '.join(sorted(unknown))}; choose from {', '.join(CHAOS)}")
    if "kill" in chaos and min(args.replicas) < 2:
        parser.error("--chaos kill needs two replicas: one to kill, one to take over")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the ExitStacks: nothing left running
    results = []
    for replicas in args.replicas:
        work = Path(tempfile.mkdtemp(prefix=f"edgefleet-replicas-{replicas}-"))
        if os.geteuid() == 0:
            os.chmod(work, 0o711)  # noqa: S103 - traverse only: postgres and mosquitto reach their own dirs
        try:
            results.append(run(args.devices, replicas, chaos, args.timeout, args.cache, work, args.workers,
                               args.silent_s))
        except RuntimeError as e:
            print(f"error: {replicas} replica(s), {args.devices} devices: {e} (work dir kept: {work})",
                  file=sys.stderr)
            return 1
        done_with(work, args.keep)
    print(render(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
