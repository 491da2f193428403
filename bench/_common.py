"""Shared by the serving benchmarks: a keep-alive OIP client, latency summaries, markdown tables."""
from __future__ import annotations

import http.client
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime import _DATATYPE_OF

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "models"


class OipClient:
    """One keep-alive HTTP/1.1 connection speaking the Open Inference Protocol's infer call."""

    def __init__(self, url: str, model: str, timeout: float = 30.0) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.path = f"/v2/models/{model}/infer"

    def infer(self, inputs: dict[str, np.ndarray], binary: bool = True) -> int:
        """Send one request and read the whole answer; returns the HTTP status."""
        body, headers = encode_request(inputs, binary)
        self.conn.request("POST", self.path, body=body, headers=headers)
        response = self.conn.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        self.conn.close()


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
