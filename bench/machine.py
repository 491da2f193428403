"""The machine a benchmark run measured: hardware, OS, library and server versions, load.

Every field is read from the running system; what cannot be read says why
instead of failing the whole report.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PACKAGES = ("onnxruntime", "paho-mqtt", "tuf", "SQLAlchemy", "fastapi", "numpy")
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    memory_gib: float
    os: str
    kernel: str
    python: str
    packages: dict[str, str]
    mosquitto: str
    postgresql: str
    date: str

    def markdown(self) -> str:
        rows = [("CPU", f"{self.cpu}, {self.cores} cores"), ("Memory", f"{self.memory_gib:.1f} GiB"),
                ("OS / kernel", f"{self.os} / Linux {self.kernel}"), ("Python", self.python),
                *((name, version) for name, version in self.packages.items()),
                ("Mosquitto", self.mosquitto), ("PostgreSQL server", self.postgresql), ("Date", self.date)]
        return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        done = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    except OSError as e:
        return f"not available ({e.strerror})"
    first = (done.stdout or done.stderr).splitlines()[:1]
    return first[0].removeprefix("mosquitto version ").strip() if first else "unknown"


def postgresql_version(url: str = DEFAULT_POSTGRES) -> str:
    """The server's own version string (the one the ingest benchmark talks to)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return str(connection.scalar(sa.text("SHOW server_version")))
    except sa.exc.SQLAlchemyError as e:
        return f"not reachable at {url.rsplit('@', 1)[-1]} ({type(e.__cause__ or e).__name__})"
    finally:
        engine.dispose()


def describe(postgres_url: str = DEFAULT_POSTGRES) -> Machine:
    return Machine(
        cpu=_cpu_model(), cores=os.cpu_count() or 0, memory_gib=_memory_gib(), os=_os_name(),
        kernel=platform.release(), python=platform.python_version(),
        packages={name: _package(name) for name in PACKAGES},
        mosquitto=mosquitto_version(), postgresql=postgresql_version(postgres_url),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
