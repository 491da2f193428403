"""Shared by the serving benchmarks: a keep-alive OIP client, latency summaries, markdown tables."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np

from bench.ports import free_port
from edgefleet.agent.runtime import _DATATYPE_OF

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "models"


class OipClient:
    """One keep-alive HTTP/1.1 connection speaking the Open Inference Protocol's infer call.

    A minimal client on a raw socket (request pre-encoded by ``prepare``, answer read
    by Content-Length, not decoded), so that what the benchmarks time is the server.
    """

    def __init__(self, url: str, model: str, timeout: float = 30.0) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.path = f"/v2/models/{model}/infer"

    def prepare(self, inputs: dict[str, np.ndarray], binary: bool = True) -> bytes:
        """The whole request (head and body) for ``send``."""
        body, headers = encode_request(inputs, binary)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return f"POST {self.path} HTTP/1.1\r\nHost: agent\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    def send(self, request: bytes) -> int:
        """Send one prepared request and read the whole answer; returns the HTTP status."""
        self.sock.sendall(request)
        status = self.reader.readline()
        if not status:
            raise ConnectionError("the server closed the connection")
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.reader.read(length)) != length:
            raise ConnectionError("the server closed the connection mid-answer")
        return int(status.split()[1])

    def infer(self, inputs: dict[str, np.ndarray], binary: bool = True) -> int:
        """Send one request and read the whole answer; returns the HTTP status."""
        return self.send(self.prepare(inputs, binary))

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def encode_request(inputs: dict[str, np.ndarray], binary: bool) -> tuple[bytes, dict[str, str]]:
    tensors, chunks = [], []
    for name, value in inputs.items():
        tensor: dict[str, Any] = {"name": name, "shape": list(value.shape), "datatype": _DATATYPE_OF[value.dtype]}
        if binary:
            raw = np.ascontiguousarray(value).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = value.reshape(-1).tolist()
        tensors.append(tensor)
    header = json.dumps({"inputs": tensors, "parameters": {"binary_data_output": binary}}).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                       "Inference-Header-Content-Length": str(len(header))}


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds (the p99 taken as the nearest-rank sample, as MLPerf does)."""
    if not seconds:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ms = np.sort(np.asarray(seconds) * 1000.0)

    def rank(q: float) -> float:
        return float(ms[min(len(ms) - 1, max(0, int(np.ceil(q * len(ms))) - 1))])

    return {"p50": rank(0.50), "p99": rank(0.99), "max": float(ms[-1])}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def digits_model(cache: Path) -> Path:
    from bench import models

    return models.digits(cache).model


def agent_command() -> list[str]:
    """``fleet-agent`` from this environment (the module when the script is not installed)."""
    script = Path(sys.executable).with_name("fleet-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgefleet.agent.cli"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert proc.stderr is not None  # started with stderr=PIPE
            raise RuntimeError(f"the agent exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the agent did not become ready within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServeProcess:
    """``fleet-agent serve MODEL --name NAME`` as a real process on a free port, ready once entered."""

    def __init__(self, model: Path, name: str, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*agent_command(), "serve", str(model), "--name", name, "--http", f"127.0.0.1:{self.port}",
                        *options]
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_ready(self.url, self.proc)
        except BaseException:
            stop_process(self.proc)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
