"""Run the benchmarks and regenerate bench/RESULTS.md.

Each benchmark runs as its own subprocess (``python -m bench.NAME ...``); its
output is saved as JSON in the runs directory, then RESULTS.md is rendered
from every saved run: the machine's description, how to reproduce each
figure, each table, and the headline ratios read back out of the tables.
``--only`` re-runs some benchmarks and keeps the others' saved runs.

    python -m bench.run_all                      # full size (about 30 min here, most of it the 10,000-device fan-out)
    python -m bench.run_all --small              # smoke sizes, into .cache/bench-small/
    python -m bench.run_all --only fanout-10k    # re-run one; RESULTS.md shows the others' last runs
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from bench._common import REPO
from bench.machine import describe, load_average
from bench.report import Run, Section, render
from edgefleet.common.fs import atomic_write

FULL_RUNS = REPO / "bench" / "runs"
FULL_RESULTS = REPO / "bench" / "RESULTS.md"
NOTES = REPO / "bench" / "notes"   # <key>.md: written by hand after a run, shown under its table
SMALL_DIR = REPO / ".cache" / "bench-small"
STDERR_TAIL = 4000
LOAD_SAMPLE_S = 5.0


@dataclass(frozen=True)
class Benchmark:
    section: Section
    module: str
    full: tuple[str, ...]
    small: tuple[str, ...] | None     # None: not part of a --small run
    timeout_s: float

    @property
    def key(self) -> str:
        return self.section.key

    def args(self, small: bool) -> tuple[str, ...]:
        return (self.small or ()) if small else self.full

    def command(self, small: bool) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args(small)]


FANOUT_NOTE = ("Separate processes: a dedicated Mosquitto, `fleetctl controller run` (SQLite) and the fleet "
               "simulator (real agent code per device, each with its own MQTT connection), all on this one "
               "machine. Every simulated device really downloads, verifies, loads, golden-checks and benchmarks "
               "the model, so the rate is bounded by one machine doing the work of the whole fleet besides the "
               "controller's; real devices do their part in parallel.")

# At this size the controller runs as an operator would run it for such a fleet: on PostgreSQL.
FANOUT_10K_DATABASE = "postgresql://postgres@127.0.0.1:5432/edgefleet_fanout_10k"
FANOUT_10K_NOTE = FANOUT_NOTE.replace("(SQLite)", "(PostgreSQL, a scratch database recreated for the run)")


def _benchmark(key: str, kind: str, title: str, module: str, full: tuple[str, ...], small: tuple[str, ...] | None,
               timeout_s: float, note: str = "") -> Benchmark:
    reproduce = shlex.join(["python", "-m", module, *full])
    return Benchmark(Section(key, kind, title, reproduce, note), module, full, small, timeout_s)


BENCHMARKS: tuple[Benchmark, ...] = (
    _benchmark("fanout-1k", "fanout", "1. Fan-out, 1,000 devices", "bench.fanout", ("--devices", "1000"),
               ("--devices", "6", "--workers", "3", "--timeout", "120"), 1800, FANOUT_NOTE),
    _benchmark("fanout-10k", "fanout", "1. Fan-out, 10,000 devices", "bench.fanout",
               ("--devices", "10000", "--timeout", "3600", "--database-url", FANOUT_10K_DATABASE,
                "--recreate-database"), None, 2 * 3600, FANOUT_10K_NOTE),
    _benchmark("ingest", "ingest", "2. Telemetry ingest (PostgreSQL, SQLite) vs a bare paho subscriber",
               "bench.ingest", ("--seconds", "30", "--devices", "20"), ("--seconds", "1", "--devices", "2"), 1800),
    _benchmark("swap", "swap", "3. Hot-swap under load", "bench.swap", ("--swaps", "100"),
               ("--swaps", "5", "--clients", "2", "--steady-seconds", "0.3", "--interval", "0.01"), 900),
    _benchmark("serving", "serving", "4. Serving overhead: OIP vs raw InferenceSession.run", "bench.serving",
               ("--models", "digits,resnet50"), ("--models", "digits", "--queries", "20"), 1800),
    _benchmark("verify", "verify", "5. Verification: TUF download+verify vs sha256sum and curl", "bench.verify",
               ("--size-mb", "100", "--repeat", "3"), ("--size-mb", "1", "--repeat", "1"), 900),
    _benchmark("footprint", "footprint", "6. Agent footprint: idle RSS and CPU vs the bare imports",
               "bench.footprint", ("--idle-seconds", "10"), ("--idle-seconds", "0.3", "--requests", "3"), 600),
    _benchmark("director", "director", "7. Signed desired states: sign and verify per desired state",
               "bench.director", ("--repeat", "2000"), ("--repeat", "50"), 300),
    _benchmark("variants", "variants", "8. Variants of real models: PP-OCR's classifier, recognizer and detector",
               "bench.variants", (), ("--small",), 1800),
    _benchmark("security", "security", "9. The cost of security: TLS handshake, signed desired states, ingest",
               "bench.security", ("--devices", "20", "--seconds", "15"),
               ("--devices", "2", "--seconds", "1", "--connects", "5", "--repeat", "20"), 900),
    _benchmark("batching", "batching", "10. Dynamic batching: 1 and 8 clients, batching off and on",
               "bench.batching", ("--seconds", "2", "--rounds", "3"),
               ("--seconds", "0.3", "--rounds", "1", "--models", "digits"), 600),
)
# Thin devices: the controller measured, not the simulator (bench/fanout.py --thin, bench/replicas.py).
THIN_DATABASE = "postgresql://postgres@127.0.0.1:5432/edgefleet_fanout_thin"
THIN_NOTE = ("Separate processes: a dedicated Mosquitto, `fleetctl controller run` (PostgreSQL, a scratch database "
             "recreated for the run) and two simulator processes of thin devices (simulator/thin.py: each device its "
             "own MQTT session, the director's check, a real TUF refresh and verified download from the controller, "
             "every event, heartbeats and counters; no ONNX model, golden set or benchmark: a fixed benchmark is "
             "reported). CPU-ms/device: each one's CPU time from the deploy to the last SUCCEEDED, over the devices "
             "(PostgreSQL: every process of the local server); cores used: their sum over the deploy's wall time. "
             "All on this one machine.")
REPLICAS_NOTE = ("Its own PostgreSQL cluster and its own Mosquitto with persistence, two `fleetctl controller run` on "
                 "one fleet home, thin devices in two processes; replica A leads, the devices fetch from replica B. "
                 "The hand-over is the time from the leader's SIGKILL until replica B holds the leader lock.")
BENCHMARKS += (
    _benchmark("fanout-thin-10k", "fanout", "11. Thin fan-out, 10,000 devices (the controller's cost)",
               "bench.fanout", ("--devices", "10000", "--thin", "--workers", "64", "--timeout", "1200",
                                "--database-url", THIN_DATABASE, "--recreate-database"), None, 3600, THIN_NOTE),
    _benchmark("fanout-thin-50k", "fanout", "12. Thin fan-out, 50,000 devices", "bench.fanout",
               ("--devices", "50000", "--thin", "--workers", "64", "--timeout", "2400", "--database-url",
                THIN_DATABASE, "--recreate-database"), None, 3 * 3600, THIN_NOTE),
    _benchmark("replicas-chaos", "replicas", "13. Replicas through a killed leader, a broker and a database restart",
               "bench.replicas", ("--devices", "2000", "--chaos", "kill,broker,database"), None, 3600, REPLICAS_NOTE),
    _benchmark("replicas-10k", "replicas", "14. Two replicas vs one, thin fan-out of 10,000 devices",
               "bench.replicas", ("--devices", "10000", "--replicas", "1", "2"), None, 3 * 3600, REPLICAS_NOTE),
)
BY_KEY = {b.key: b for b in BENCHMARKS}


def run_one(benchmark: Benchmark, small: bool) -> Run:
    """Run one benchmark to completion (or its timeout), sampling the machine's load meanwhile;
    never raises for the benchmark's own failure."""
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    code = code_version()  # what its processes load as they start
    load_before, clock = load_average(), time.monotonic()
    peak, note = load_before[0], ""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(benchmark.command(small), cwd=REPO, stdout=out, stderr=err)
        while True:
            try:
                returncode = proc.wait(timeout=LOAD_SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                peak = max(peak, load_average()[0])
                if time.monotonic() - clock > benchmark.timeout_s:
                    proc.kill()
                    returncode = proc.wait()
                    note = f"\nrun_all: stopped after its {benchmark.timeout_s:.0f} s timeout"
                    break
        stdout, stderr = (_read(f) for f in (out, err))
    load_after = load_average()
    if (now := code_version()) != code:
        code = f"{code} (then {now.removeprefix('commit ')} by its end)"
    return Run(key=benchmark.key, command=["python", "-m", benchmark.module, *benchmark.args(small)],
               returncode=returncode, stdout=stdout, stderr_tail=(stderr + note)[-STDERR_TAIL:], started=started,
               seconds=time.monotonic() - clock, load_before=load_before, load_after=load_after,
               size="small" if small else "full", code=code, load_peak=max(peak, load_after[0]))


def _read(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def saved_runs(runs_dir: Path) -> dict[str, Run]:
    runs = {}
    for benchmark in BENCHMARKS:
        path = runs_dir / f"{benchmark.key}.json"
        if path.exists():
            runs[benchmark.key] = Run.load(path)
    return runs


def code_version() -> str:
    """The commit measured, and whether the package's files differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        # the saved runs and the results they render are data, not the code measured
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/runs", ":!bench/RESULTS.md", ":!bench/notes"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {commit}" + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="smoke sizes (seconds, not minutes)")
    parser.add_argument("--only", nargs="+", choices=list(BY_KEY), metavar="NAME",
                        help=f"run only these ({', '.join(BY_KEY)}); the others' saved runs are kept")
    parser.add_argument("--render-only", action="store_true", help="run nothing: re-render from the saved runs")
    parser.add_argument("--runs-dir", type=Path, help="saved runs (default: bench/runs, or .cache/bench-small/runs)")
    parser.add_argument("--output", type=Path, help="default: bench/RESULTS.md, or .cache/bench-small/RESULTS.md")
    args = parser.parse_args(argv)
    runs_dir = args.runs_dir or (SMALL_DIR / "runs" if args.small else FULL_RUNS)
    output = args.output or (SMALL_DIR / "RESULTS.md" if args.small else FULL_RESULTS)
    runs_dir.mkdir(parents=True, exist_ok=True)
    chosen = [] if args.render_only else [BY_KEY[key] for key in (args.only or BY_KEY)]
    failed = []
    for benchmark in chosen:
        if args.small and benchmark.small is None:
            continue
        print(f"run_all: {shlex.join(benchmark.command(args.small)[1:])}", file=sys.stderr, flush=True)
        run = run_one(benchmark, args.small)
        atomic_write(runs_dir / f"{benchmark.key}.json", run.to_json())
        print(f"run_all: {benchmark.key} {'ok' if run.ok else f'FAILED (exit {run.returncode})'} "
              f"in {run.seconds:.0f} s", file=sys.stderr, flush=True)
        if not run.ok:
            failed.append(benchmark.key)
    sections = [b.section for b in BENCHMARKS if not (args.small and b.small is None)]
    whole = "python -m bench.run_all" + (" --small" if args.small else "")
    notes = {} if args.small else {path.stem: path.read_text() for path in NOTES.glob("*.md")}
    text = render(describe(), sections, saved_runs(runs_dir), whole, notes)
    atomic_write(output, text.encode())
    print(f"run_all: wrote {os.path.relpath(output, Path.cwd())}" +
          (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
