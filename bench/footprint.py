"""Agent footprint: idle RSS and CPU of `fleet-agent serve` with the digits model loaded,
vs a bare ``python -c "import onnxruntime, paho.mqtt.client, tuf.ngclient"``.

Both run as real processes; after the agent answered a few requests, both sit
idle for the same time while their RSS and CPU time are read from /proc.

    python -m bench.footprint [--idle-seconds 10] [--model M.onnx]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from bench._common import DEFAULT_CACHE, OipClient, digits_model, table

BARE_IMPORTS = "import onnxruntime, paho.mqtt.client, tuf.ngclient"
ORT_ONLY = "import onnxruntime"  # `serve` needs no MQTT or TUF: this is its like-for-like floor
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_command(model: Path, port: int) -> list[str]:
    script = Path(sys.executable).with_name("fleet-agent")
    serve = [str(script)] if script.exists() else [sys.executable, "-m", "edgefleet.agent.serve"]
    return [*serve, *(["serve"] if script.exists() else []), str(model), "--name", "digits",
            "--http", f"127.0.0.1:{port}"]


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


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the agent did not become ready within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_agent(model: Path, idle_seconds: float, requests: int) -> dict:
    port = _free_port()
    proc = subprocess.Popen(_agent_command(model, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        client = OipClient(url, "digits")
        x = {"input": np.random.default_rng(0).random((1, 64), dtype=np.float32)}
        try:
            if any(client.infer(x) != 200 for _ in range(requests)):
                raise RuntimeError("the agent failed a request")
        finally:
            client.close()
        return idle_figures(proc.pid, idle_seconds)
    finally:
        _stop(proc)


def measure_bare(idle_seconds: float, imports: str = BARE_IMPORTS) -> dict:
    code = f"{imports}; import sys, time; print('ready', flush=True); time.sleep(3600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"bare imports failed: {proc.stderr.read().decode()[-500:]}")
        return idle_figures(proc.pid, idle_seconds)
    finally:
        _stop(proc)


def report(agent: dict, bare: dict, ort_only: dict, idle_seconds: float) -> str:
    rows = [
        ("fleet-agent serve, digits loaded", agent["rss_mb"], agent["cpu_percent"], agent["threads"]),
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
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=50, help="requests served before idling")
    parser.add_argument("--model", type=Path, help="default: the digits model")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    model = args.model or digits_model(args.cache)
    agent = measure_agent(model, args.idle_seconds, args.requests)
    bare = measure_bare(args.idle_seconds)
    ort_only = measure_bare(args.idle_seconds, ORT_ONLY)
    print(report(agent, bare, ort_only, args.idle_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
