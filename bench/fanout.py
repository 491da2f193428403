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

    python -m bench.fanout --devices 1000
"""
from __future__ import annotations

import argparse
import json
import os
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
from pathlib import Path
from typing import TypeVar

from bench._common import DEFAULT_CACHE, table

AWS_IOT_JOBS_PER_MIN = 1000.0  # the anchor: AWS IoT Jobs' maximum rollout rate
MODEL, VERSION = "digits", "1.0.0"
PREFIX = "fan"


@dataclass(frozen=True)
class FanoutResult:
    devices: int
    enroll_s: float          # setup: enrollment + first connect (not part of the figure)
    deploy_s: float          # deploy -> controller recorded every device SUCCEEDED
    device_side_s: float     # deploy -> the last device's SUCCEEDED event (simulator's view)
    broker_s: float          # bare fan-out of N retained messages to N subscribers
    rss_per_device_kb: float
    threads: int

    @property
    def per_minute(self) -> float:
        return self.devices / self.deploy_s * 60.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                    "max_queued_messages 0\nset_tcp_nodelay true\n")
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
        conn = MqttConnection(url, ConnectionOptions(client_id=f"bench-sub-{i}", persistent=False),
                              on_connect=on_connect, on_message=lambda _m: received.release())
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


def run(devices: int, classes: str, workers: int, database_url: str, timeout: float, cache: Path,
        work: Path) -> FanoutResult:
    from edgefleet.controller.cli.client import ApiClient
    from edgefleet.controller.rollout.spec import RolloutSpec

    port = _free_port()
    with ExitStack() as stack:
        broker_log = work / "mosquitto.log"
        stack.enter_context(process(mosquitto(work, port), broker_log))
        broker_url = f"mqtt://127.0.0.1:{port}"
        wait_for("mosquitto", lambda: _connectable(port), 20)
        broker_s = broker_fanout(broker_url, devices, timeout)
        # chosen after the fan-out: its N client connections may have taken the port picked before
        api_port = _free_port()
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

        status = work / "fleet.json"
        sim_log = work / "simulator.log"
        began = time.monotonic()
        simulator = stack.enter_context(process(
            [sys.executable, "-m", "edgefleet.simulator", "--controller", controller_url, "--token", token,
             "--devices", str(devices), "--classes", classes, "--prefix", PREFIX, "--workers", str(workers),
             "--state-root", str(work / "devices"), "--status-file", str(status), "--status-interval", "1",
             "--requests-per-s", "0"],  # fan-out alone: no inference traffic competing for the CPU
            sim_log, env))
        wait_for("every simulated device to connect",
                 lambda: read_status(status).get("connected") == devices, timeout, simulator, sim_log)
        wait_for("the controller to see every device online",
                 lambda: sum(d["online"] for d in client.get("/v1/devices", selector=f"fleet={PREFIX}")) == devices,
                 timeout, controller, controller_log, interval=1.0)
        enroll_s = time.monotonic() - began

        spec = RolloutSpec(model=MODEL, version=VERSION, selector=f"fleet={PREFIX}", stages=(1.0,), bake_s=0.0,
                           bench_seconds=0.05, min_devices_per_stage=1, device_timeout_s=timeout)
        started = time.monotonic()
        created = client.post("/v1/rollouts", {"manifest": spec.to_manifest(f"fanout-{devices}"), "dry_run": False})
        device_done: list[float] = []
        recorded: list[int] = [0]  # SUCCEEDED as the controller counts them, at the last look

        def finished() -> bool:
            if not device_done and read_status(status).get("states", {}).get("SUCCEEDED") == devices:
                device_done.append(time.monotonic())
            summary = next(r for r in client.get("/v1/rollouts") if r["id"] == created["id"])
            recorded[0] = summary["succeeded"]
            if summary["failed"]:
                raise RuntimeError(f"{summary['failed']} device(s) failed; see {sim_log}")
            return summary["succeeded"] == devices

        try:
            wait_for("every device SUCCEEDED", finished, timeout, controller, controller_log, interval=0.5)
        except RuntimeError as e:  # say how far it got: a partial run is still a measurement
            devices_side = (f"; every device had reported SUCCEEDED {device_done[0] - started:.0f} s after the deploy"
                            if device_done else "")
            raise RuntimeError(f"{e} (the controller had recorded {recorded[0]} of {devices} SUCCEEDED"
                               f"{devices_side})") from e
        deploy_s = time.monotonic() - started
        stats = read_status(status)
        device_side = (device_done[0] if device_done else time.monotonic()) - started
    return FanoutResult(devices, enroll_s, deploy_s, device_side, broker_s,
                        stats.get("rss_per_device_kb", 0.0), stats.get("threads", 0))


def _connectable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def render(results: list[FanoutResult]) -> str:
    rows = [(r.devices, f"{r.deploy_s:.1f}", f"{r.device_side_s:.1f}", f"{r.per_minute:,.0f}",
             f"{r.per_minute / AWS_IOT_JOBS_PER_MIN:.2f}", f"{r.broker_s:.2f}", f"{r.deploy_s / r.broker_s:.1f}",
             f"{r.rss_per_device_kb:.0f}", r.threads, f"{r.enroll_s:.0f}")
            for r in results]
    return "\n".join([
        "Fan-out: deploy (API) -> every device SUCCEEDED, Mosquitto, digits model, simulated fleet", "",
        table(["devices", "deploy→all SUCCEEDED s", "last device event s", "devices/min",
               "vs AWS IoT Jobs (1,000/min)", "bare broker fan-out s", "deploy / bare broker",
               "simulator RSS/device KiB", "simulator threads", "setup (enroll+connect) s"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1000], help="Fleet sizes to run, e.g. 1000 10000.")
    parser.add_argument("--classes", default="x86_64,rpi-4")
    parser.add_argument("--workers", type=int, default=8, help="Simulator reconcile workers.")
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
    results = []
    for n in args.devices:
        work = Path(tempfile.mkdtemp(prefix=f"edgefleet-fanout-{n}-"))
        try:
            if args.recreate_database:
                recreate_database(args.database_url)
            results.append(run(n, args.classes, args.workers, args.database_url, args.timeout, args.cache, work))
        except RuntimeError as e:
            print(f"error: fan-out with {n} devices: {e} (work dir kept: {work})", file=sys.stderr)
            progress = read_status(work / "fleet.json")
            if progress:  # how far it got, for a report of a run that did not finish
                print(f"last simulator status: {progress.get('connected')} of {n} connected, "
                      f"device states {progress.get('states')}", file=sys.stderr)
            return 1
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir: {work}", file=sys.stderr)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
