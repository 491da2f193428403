"""edgefleet's story as reusable steps, shared by the demo and the end-to-end tests.

A fleet home and its keys, the digits model's bundles (two good versions and a
bad one), the controller as a real ``fleetctl controller run`` process, and the
operator's commands as real ``fleetctl`` processes. Nothing here reaches inside
the controller: it drives edgefleet the way an operator would.

The bad version is bad only where devices can see it: its int8 variant (for x86
devices) is about 30x slower, and its fp32 variant (for Arm devices) carries a
golden set its model does not reproduce. Both pass the build's accuracy check.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent
# Simulated hardware: real x86 CPUs here, profiles faked to look like each class.
HARDWARE_CLASSES: dict[str, dict[str, Any]] = {
    "x86_64": {"arch": "x86_64"},
    "rpi-4": {
        "arch": "aarch64", "cpu_model": "Cortex-A72", "cpu_features": ["neon"], "memory_mb": 3796,
        "device_model": "Raspberry Pi 4 Model B Rev 1.4", "gpu": "",
    },
}
TERMINAL = {"SUCCEEDED", "FAILED", "ROLLED_BACK", "ABORTED", "SUPERSEDED"}

Echo = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass
class Fleetctl:
    """``fleetctl`` as the operator runs it, against one fleet home."""

    home: Path
    echo: Echo = quiet

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "EDGEFLEET_HOME": str(self.home)}

    def __call__(self, *args: str, check: bool = True, show: bool = True) -> str:
        if show:
            self.echo(f"$ fleetctl {' '.join(_quote(a) for a in args)}")
        done = subprocess.run([str(BIN / "fleetctl"), *args], env=self.env, capture_output=True, text=True,
                              timeout=300)
        output = (done.stdout + done.stderr).rstrip()
        if show and output:
            self.echo(output)
        if check and done.returncode != 0:
            raise ScenarioError(f"`fleetctl {' '.join(args)}` exited {done.returncode}: {output[-2000:]}")
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--format", "json", show=False))


class ScenarioError(RuntimeError):
    """A step did not go as the story says."""


def stop_process(proc: subprocess.Popen | None, wait_s: float) -> None:
    """SIGTERM, a clean shutdown within ``wait_s``, else SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in " ()*") else arg


def write_config(home: Path, api_port: int, broker_url: str = "", embedded_broker_port: int = 1884,
                 database_url: str = "") -> None:
    """A controller config for a fleet home (before ``fleetctl init``)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        f"api_port = {api_port}",
        f'public_url = "http://127.0.0.1:{api_port}"',
        f"embedded_broker_port = {embedded_broker_port}",
        "scheduler_interval_s = 0.5",
        "heartbeat_timeout_s = 30",
    ]
    if broker_url:
        lines.append(f'broker_url = "{broker_url}"')
    if database_url:
        lines.append(f'database_url = "{database_url}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")


# --- bundles ------------------------------------------------------------------


@dataclass(frozen=True)
class Bundles:
    good: list[Path]   # versions in publishing order
    bad: Path


def build_bundles(fleetctl: Fleetctl, work: Path, model_cache: Path,
                  good_versions: tuple[str, ...] = ("1.0.0", "1.1.0"), bad_version: str = "1.2.0") -> Bundles:
    from bench import models

    digits = models.digits(model_cache)
    data = ["--calibration", str(digits.calibration_data), "--eval", str(digits.eval_data)]
    variants = ["--variant", "cpu-fp32", "--variant", "cpu-int8"]
    good = []
    for version in good_versions:
        out = work / f"digits-{version}"
        fleetctl("bundle", "build", str(digits.model), "--name", "digits", "--version", version,
                 *variants, *data, "-o", str(out))
        good.append(out)
    bad = work / f"digits-{bad_version}"
    fleetctl("bundle", "build", str(models.slow_digits(model_cache)), "--name", "digits",
             "--version", bad_version, *variants, *data, "-o", str(bad))
    spoil(bad)
    return Bundles(good, bad)


def spoil(bundle: Path) -> None:
    """Make a built bundle bad in the ways only devices notice (see the module docstring)."""
    from edgefleet.common.golden import GoldenSet

    report = json.loads((bundle / "report.json").read_text())
    for entry in report["variants"]:
        if entry["variant"] == "cpu-int8":
            entry["requirements"]["arch"] = ["x86_64"]  # int8 kernels tuned for x86: Arm gets fp32
        if entry["variant"] == "cpu-fp32":
            path = bundle / entry["golden"]
            golden = GoldenSet.load(path)
            shifted = {name: np.roll(out, 1, axis=-1) for name, out in golden.outputs.items()}
            GoldenSet(golden.inputs, shifted, golden.atol, golden.rtol, golden.top1).save(path)
    (bundle / "report.json").write_text(json.dumps(report, indent=2))


# --- the controller -------------------------------------------------------------


@dataclass
class Controller:
    """``fleetctl controller run`` as a real process."""

    home: Path
    url: str
    env: dict[str, str] = field(default_factory=dict)  # config overrides (EDGEFLEET_<KEY>) of this process
    name: str = "controller"
    log_path: Path = field(init=False)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.log_path = self.home / f"{self.name}.log"

    def start(self, timeout: float = 60.0) -> Controller:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "fleetctl"), "controller", "run"], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "EDGEFLEET_HOME": str(self.home)},
            )
        wait_for(lambda: self._healthy(), timeout, "the controller to answer /healthz", self.log)
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ScenarioError(f"the controller exited {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2):  # noqa: S310 - our own http:// URL
                return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """Power cut for the controller: SIGKILL, no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, 30)


# --- devices ------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, context: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise ScenarioError(f"timed out after {timeout:.0f}s waiting for {what}\n{context()}")


def wait_for_fleet(fleetctl: Fleetctl, classes: dict[str, str], timeout: float = 60.0) -> list[dict]:
    """Until every device in ``classes`` (id -> hardware class) is online and reports that class."""

    def ready() -> list[dict] | None:
        devices = {d["id"]: d for d in fleetctl.json("devices", "list")}
        ok = all(
            (d := devices.get(device)) and d.get("online") and d.get("hardware_class") == hw
            for device, hw in classes.items()
        )
        return list(devices.values()) if ok else None

    return wait_for(ready, timeout, f"devices {sorted(classes)} online with their hardware classes")


def wait_rollout(fleetctl: Fleetctl, rollout: str, timeout: float = 180.0,
                 on_change: Callable[[dict], None] | None = None) -> dict:
    """Poll ``rollout status`` until the rollout is terminal; ``on_change`` sees each new state."""
    seen: list[str] = []

    def done() -> dict | None:
        status = fleetctl.json("rollout", "status", rollout)
        fingerprint = json.dumps(_progress(status), sort_keys=True)
        if on_change is not None and (not seen or seen[-1] != fingerprint):
            seen.append(fingerprint)
            on_change(status)
        return status if status["state"] in TERMINAL else None

    return wait_for(done, timeout, f"rollout {rollout} to finish",
                    lambda: fleetctl("rollout", "status", rollout, check=False, show=False))


def _progress(status: dict) -> Any:
    return {k: status.get(k) for k in ("state", "stage", "progress", "gates", "detail")}


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_demo(label: str, body: Callable[[Path], None], logs: str, keep: bool) -> int:
    """A demo's exit status: ``body`` runs in a fresh work folder, removed afterwards unless kept
    (or the story failed: ``logs``, formatted with ``work``, says where to look)."""
    work = Path(tempfile.mkdtemp(prefix=f"edgefleet-{label}-"))
    try:
        body(work)
        return 0
    except ScenarioError as e:
        print(f"\n{label} FAILED: {e}", file=sys.stderr)
        print(f"logs: {logs.format(work=work)}", file=sys.stderr)
        keep = True
        return 1
    finally:
        if not keep:
            cleanup(work)
        else:
            print(f"{label} files kept in {work}", file=sys.stderr)


@dataclass
class AgentProcess:
    """A real device agent: ``fleet-agent enroll`` then ``fleet-agent run``, profile faked to ``hw_class``."""

    name: str
    hw_class: str
    state_dir: Path
    serve_port: int
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.state_dir / "agent.toml"

    def enroll(self, fleetctl: Fleetctl, controller_url: str) -> AgentProcess:
        from edgefleet.agent.config import AgentConfig

        token = fleetctl.json("devices", "enroll", self.name)["token"]
        done = subprocess.run(
            [str(BIN / "fleet-agent"), "enroll", "--controller", controller_url, "--token", token,
             "--state-dir", str(self.state_dir)], capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise ScenarioError(f"fleet-agent enroll {self.name} failed: {done.stderr.strip()}")
        config = AgentConfig.load(self.config_path)
        config.serve = f"127.0.0.1:{self.serve_port}"
        config.heartbeat_s = 2.0
        config.hardware_override = HARDWARE_CLASSES[self.hw_class]
        self.config_path.write_text(config.to_toml())
        return self

    def start(self) -> AgentProcess:
        with open(self.state_dir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "fleet-agent"), "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def serving(self) -> str | None:
        """The model version the agent's inference server answers with (None: nothing served)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.serve_port}/v2/models/digits", timeout=5) as r:
                return json.loads(r.read())["versions"][0]
        except OSError:
            return None

    def log(self) -> str:
        path = self.state_dir / "agent.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, 20)
