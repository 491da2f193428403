"""Agent footprint: idle RSS and CPU of the agent with the digits model loaded,
vs a bare ``python -c "import onnxruntime, paho.mqtt.client, tuf.ngclient"``.

Two agents are measured: ``fleet-agent serve`` (one local model, no controller)
and the full daemon ``fleet-agent run`` connected to a broker, its state dir
seeded with the digits model installed in the active slot (as after a verified
update and a reboot: the daemon loads the active slot, connects, reports and
idles). All run as real processes; after an agent answered a few requests,
each sits idle for the same time while its RSS and CPU time are read from /proc.

    python -m bench.footprint [--idle-seconds 10] [--model M.onnx] [--broker mqtt://127.0.0.1:1883]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench._common import (
    DEFAULT_CACHE,
    OipClient,
    ServeProcess,
    agent_command,
    free_port,
    stop_process,
    table,
    wait_ready,
)

BARE_IMPORTS = "import onnxruntime, paho.mqtt.client, tuf.ngclient"
ORT_ONLY = "import onnxruntime"  # `serve` needs no MQTT or TUF: this is its like-for-like floor
TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEVICE = "footprint-bench"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def idle_figures(pid: int, seconds: float) -> dict:
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return {"rss_mb": rss_mb(pid), "cpu_percent": 100.0 * (cpu1 - cpu0) / (t1 - t0), "threads": threads(pid)}


def _serve_requests(url: str, requests: int) -> None:
    client = OipClient(url, "digits")
    x = {"input": np.random.default_rng(0).random((1, 64), dtype=np.float32)}
    try:
        if any(client.infer(x) != 200 for _ in range(requests)):
            raise RuntimeError("the agent failed a request")
    finally:
        client.close()


def _grpc_installed() -> bool:
    try:
        import grpc  # noqa: F401 - the agent's grpc extra
    except ImportError:
        return False
    return True


def measure_agent(model: Path, idle_seconds: float, requests: int, *options: str) -> dict:
    with ServeProcess(model, "digits", *options) as agent:
        _serve_requests(agent.url, requests)
        return idle_figures(agent.pid, idle_seconds)


def seed_state_dir(state_dir: Path, model: Path, golden: Path) -> None:
    """Install ``model`` in the active slot through the agent's own Slots, as a finished update leaves it."""
    from edgefleet.agent.slots import (
        GOLDEN_FILE,
        MODEL_FILE,
        SlotMeta,
        Slots,
        slot_name,
    )
    from edgefleet.common.hardware import Requirements
    from edgefleet.common.protocol import ModelRef, TargetInfo

    ref = ModelRef(model="digits", version="1.0.0", variant="cpu-fp32", release=1)
    target = TargetInfo(model=ref.model, version=ref.version, variant=ref.variant, release=ref.release,
                        requirements=Requirements(), golden="digits/1.0.0/cpu-fp32.golden.npz",
                        golden_sha256=hashlib.sha256(golden.read_bytes()).hexdigest())
    slots = Slots(state_dir)
    name = slot_name(ref)
    staging = slots.staging(name)
    shutil.copyfile(model, staging / MODEL_FILE)
    shutil.copyfile(golden, staging / GOLDEN_FILE)
    slots.install(name, SlotMeta(ref, target, hashlib.sha256(model.read_bytes()).hexdigest(), time.time()))
    slots.activate(name)


def _wait_reported(broker: str, seconds: float = 30.0) -> None:
    """The daemon's retained `reported` message on the broker: proof that it is connected."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.common import protocol
    from edgefleet.common.mqtt import BrokerURL

    url = BrokerURL.parse(broker)
    got = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{DEVICE}-watch-{os.getpid()}")
    client.on_message = lambda _c, _u, message: got.set() if message.payload else None
    client.connect(url.host, url.port)
    client.subscribe(protocol.topic(DEVICE, protocol.Channel.REPORTED), qos=1)
    client.loop_start()
    try:
        if not got.wait(seconds):
            raise RuntimeError(f"the daemon did not report on {broker} within {seconds:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


def measure_daemon(model: Path, golden: Path, broker: str, idle_seconds: float, requests: int) -> dict:
    """`fleet-agent run` with the digits model active, connected to ``broker``, idle after a few requests."""
    from edgefleet.agent.config import AgentConfig

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="edgefleet-footprint-") as work:
        state_dir = Path(work) / "state"
        seed_state_dir(state_dir, model, golden)
        config = Path(work) / "agent.toml"
        # the controller URL is never reached while idle: no desired state names an update
        config.write_text(AgentConfig(device_id=DEVICE, state_dir=state_dir, broker_url=broker,
                                      controller_url=f"http://127.0.0.1:{free_port()}",
                                      serve=f"127.0.0.1:{port}").to_toml())
        proc = subprocess.Popen([*agent_command(), "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            _wait_reported(broker)
            _serve_requests(url, requests)
            return idle_figures(proc.pid, idle_seconds)
        finally:
            stop_process(proc)


def measure_bare(idle_seconds: float, imports: str = BARE_IMPORTS) -> dict:
    code = f"{imports}; import sys, time; print('ready', flush=True); time.sleep(3600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"bare imports failed: {proc.stderr.read().decode()[-500:]}")
        return idle_figures(proc.pid, idle_seconds)
    finally:
        stop_process(proc)


def report(agent: dict, bare: dict, ort_only: dict, idle_seconds: float, daemon: dict | None = None,
           grpc: dict | None = None) -> str:
    rows = [
        ("fleet-agent serve, digits loaded", agent["rss_mb"], agent["cpu_percent"], agent["threads"]),
        *([("fleet-agent serve --grpc (REST and gRPC, the grpc extra), digits loaded", grpc["rss_mb"],
            grpc["cpu_percent"], grpc["threads"])] if grpc else []),
        *([("fleet-agent run (daemon: MQTT connected, digits active)", daemon["rss_mb"], daemon["cpu_percent"],
            daemon["threads"])] if daemon else []),
        (f"bare `python -c \"{BARE_IMPORTS}\"`", bare["rss_mb"], bare["cpu_percent"], bare["threads"]),
        (f"bare `python -c \"{ORT_ONLY}\"` (what serve imports)", ort_only["rss_mb"], ort_only["cpu_percent"],
         ort_only["threads"]),
    ]
    return "\n".join([
        f"### Agent footprint (idle for {idle_seconds:g} s)",
        "",
        table(["process", "RSS MiB", "idle CPU %", "threads"], rows),
        "",
        f"RSS agent / bare imports: **{agent['rss_mb'] / bare['rss_mb']:.2f}x** "
        f"({agent['rss_mb'] - bare['rss_mb']:+.1f} MiB); agent / `{ORT_ONLY}`: "
        f"**{agent['rss_mb'] / ort_only['rss_mb']:.2f}x** ({agent['rss_mb'] - ort_only['rss_mb']:+.1f} MiB)",
        *([f"RSS daemon / bare imports: **{daemon['rss_mb'] / bare['rss_mb']:.2f}x** "
           f"({daemon['rss_mb'] - bare['rss_mb']:+.1f} MiB)"] if daemon else []),
        *([f"RSS serve --grpc / serve: **{grpc['rss_mb'] / agent['rss_mb']:.2f}x** "
           f"({grpc['rss_mb'] - agent['rss_mb']:+.1f} MiB for gRPC)"] if grpc else []),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=50, help="requests served before idling")
    parser.add_argument("--model", type=Path, help="default: the digits model")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--broker", default=DEFAULT_BROKER,
                        help="broker for the `fleet-agent run` daemon ('' skips the daemon)")
    args = parser.parse_args(argv)
    from bench import models

    digits = models.digits(args.cache)
    model = args.model or digits.model
    agent = measure_agent(model, args.idle_seconds, args.requests)
    grpc = (measure_agent(model, args.idle_seconds, args.requests, "--grpc", f"127.0.0.1:{free_port()}")
            if _grpc_installed() else None)
    daemon = (measure_daemon(model, digits.eval_data, args.broker, args.idle_seconds, args.requests)
              if args.broker else None)
    bare = measure_bare(args.idle_seconds)
    ort_only = measure_bare(args.idle_seconds, ORT_ONLY)
    print(report(agent, bare, ort_only, args.idle_seconds, daemon, grpc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
