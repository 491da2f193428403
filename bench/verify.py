"""Benchmark 5, verification: TUF download+verify of a large target versus sha256sum and curl.

A fresh fleet home signs one target of ``--size-mb`` (random bytes) and the
controller's own repository route serves it (FastAPI under uvicorn, as
``fleetctl controller run`` does). Measured on the same file, same server:

- TUF: the agent's ``ModelUpdater`` — metadata refresh, target lookup, then
  the resumable download that enforces length and SHA-256 while streaming,
  fsyncs and renames into place (what a device does for every update);
- ``sha256sum`` of the stored file (hashing alone, no network);
- ``curl`` fetching the same URL into a file (transfer alone, no verification).

    python -m bench.verify --size-mb 100 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench._common import table

if TYPE_CHECKING:
    from edgefleet.controller.config import ControllerConfig

MODEL, VERSION, VARIANT = "verifybench", "1.0.0", "cpu-fp32"


@dataclass(frozen=True)
class Result:
    method: str
    seconds: float   # median of the repeats

    def mb_per_s(self, size: int) -> float:
        return size / 1e6 / self.seconds


def make_bundle(out: Path, size: int) -> Path:
    """What `fleetctl bundle build` leaves: report.json, the (here random) model file, a golden set."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    with open(out / f"{VARIANT}.onnx", "wb") as f:
        for left in range(size, 0, -(1 << 24)):
            f.write(rng.bytes(min(left, 1 << 24)))
    np.savez(out / f"{VARIANT}.golden.npz", x=np.zeros((1, 4), np.float32))
    report = {"model": MODEL, "version": VERSION, "created": "2026-01-01T00:00:00Z", "reference": {},
              "variants": [{"variant": VARIANT, "file": f"{VARIANT}.onnx", "golden": f"{VARIANT}.golden.npz",
                            "requirements": {}, "preference": 0}], "refused": []}
    (out / "report.json").write_text(json.dumps(report))
    return out


class RepositoryServer:
    """The controller's API app under uvicorn in a thread, serving its repository route."""

    def __init__(self, config: ControllerConfig) -> None:
        import uvicorn

        from edgefleet.controller.api.app import create_app
        from edgefleet.controller.api.deps import ApiContext
        from edgefleet.controller.store import open_store

        # the controller's app; only its public repository route is called, which needs no database
        app = create_app(ApiContext(config=config, db=None, store=open_store(config)))  # type: ignore[arg-type]
        # IPPROTO_TCP as uvicorn's own bind gets it from getaddrinfo: asyncio sets TCP_NODELAY only on
        # sockets whose proto says TCP, and without it every answer on a kept-alive connection waited
        # 40 ms for the client's delayed ACK before its body left (Nagle)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=lambda: self._server.run(sockets=[self._socket]), daemon=True)

    def __enter__(self) -> RepositoryServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the repository server did not start in 20 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()


def timed(repeat: int, runs: dict[str, tuple[Callable[[], None], Callable[[], None]]]) -> dict[str, float]:
    """Median wall time of each ``(before, run)`` over ``repeat`` rounds, the methods taking turns in each
    round so that the machine's drift (neighbours, clock) hits all alike; ``before`` runs untimed."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, (before, run) in runs.items():
            before()
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(size_mb: float, repeat: int, work: Path) -> tuple[int, list[Result]]:
    from edgefleet.agent.fetch import ModelUpdater, trust_root
    from edgefleet.common.protocol import target_path
    from edgefleet.controller.home import init_home
    from edgefleet.controller.signing import Repository

    size = int(size_mb * 1e6)
    config = init_home(work / "home")
    repository = Repository.from_config(config)
    repository.publish(make_bundle(work / "bundle", size))
    path = target_path(MODEL, VERSION, VARIANT)
    stored = next((config.store_path / "repository/targets" / MODEL / VERSION).glob(f"*.{VARIANT}.onnx"))
    device = work / "device"
    dest = device / "model.onnx"

    with RepositoryServer(config) as server:
        def fresh_device() -> None:
            shutil.rmtree(device, ignore_errors=True)
            trust_root(device / "tuf", repository.trusted_root())

        def tuf() -> None:
            updater = ModelUpdater(device / "tuf", f"{server.url}/repository/metadata/",
                                   f"{server.url}/repository/targets/")
            updater.refresh()
            target, _info = updater.find(path)
            updater.download(target, dest)

        url = f"{server.url}/repository/targets/{MODEL}/{VERSION}/{stored.name}"
        curl_out = work / "curl.out"
        def nothing() -> None:
            pass

        medians = timed(repeat, {
            "TUF download + verify (ModelUpdater)": (fresh_device, tuf),
            "sha256sum of the stored file": (nothing, lambda: _run(["sha256sum", str(stored)])),
            "curl of the same URL": (nothing, lambda: _run(["curl", "-sSf", "-o", str(curl_out), url])),
        })
        results = [Result(method, seconds) for method, seconds in medians.items()]
    if dest.stat().st_size != size or curl_out.stat().st_size != size:
        raise RuntimeError("a transfer came back short; the figures would be meaningless")
    return size, results


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stderr.decode(errors='replace').strip()[:300]}")


def render(size: int, results: list[Result]) -> str:
    tuf = results[0]
    rows = [(r.method, f"{r.seconds:.3f}", f"{r.mb_per_s(size):.1f}", f"{tuf.seconds / r.seconds:.2f}")
            for r in results]
    lines = [f"Verification: {size / 1e6:g} MB target, median of the repeats (the methods taking turns)", "",
             table(["method", "seconds", "MB/s", "speed vs TUF"], rows), ""]
    by = {r.method.split()[0]: r for r in results}
    lines.append(f"TUF download+verify runs at {tuf.mb_per_s(size) / by['sha256sum'].mb_per_s(size):.2f}x "
                 f"the speed of sha256sum and {tuf.mb_per_s(size) / by['curl'].mb_per_s(size):.2f}x the speed of curl")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for tool in ("sha256sum", "curl"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed; install it (e.g. apt-get install -y {tool})", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="edgefleet-verify-") as work:
        size, results = measure(args.size_mb, args.repeat, Path(work))
    print(render(size, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
