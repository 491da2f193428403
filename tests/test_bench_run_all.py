"""bench/run_all.py: headline ratios read back from each script's own tables, RESULTS.md rendering,
and one real --small run of a benchmark subset (a smoke test: no timing asserts)."""
from __future__ import annotations

import json
import subprocess
import sys

from bench import batching, fanout, footprint, ingest, serving, swap, verify
from bench.machine import Machine
from bench.report import Run, headlines, render, tables
from bench.run_all import BENCHMARKS
from tests.conftest import REPO

MACHINE = Machine(cpu="Test CPU", cores=2, memory_gib=4.0, os="TestOS", kernel="6.0", python="3.11.0",
                  packages={"onnxruntime": "1.0"}, mosquitto="2.0.11", postgresql="15.0", date="2026-01-01 00:00 UTC")


def _run(key: str, stdout: str, returncode: int = 0, stderr: str = "") -> Run:
    return Run(key=key, command=["python", "-m", f"bench.{key}"], returncode=returncode, stdout=stdout,
               stderr_tail=stderr, started="2026-01-01 00:00:00 UTC", seconds=12.0, load_before=(1.0, 1.5, 2.0),
               load_after=(3.5, 2.0, 2.0), size="full", code="commit abc")


def test_tables_are_read_by_header():
    text = "title\n\n| a | b |\n|---|---|\n| 1 | x y |\n| 2 | z |\n\nafter\n| c |\n|---|\n| 3 |"
    assert tables(text) == [[{"a": "1", "b": "x y"}, {"a": "2", "b": "z"}], [{"c": "3"}]]


def test_fanout_headline_from_its_own_table():
    out = fanout.render([fanout.FanoutResult(devices=1000, enroll_s=30.0, deploy_s=40.0, device_side_s=39.0,
                                             broker_s=0.5, rss_per_device_kb=100.0, threads=10)])
    (line,) = headlines("fanout", out)
    assert "1,000 devices" in line and "40.0 s" in line and "**1,500 devices/min**" in line and "1.50x AWS" in line


def test_ingest_headline_from_its_own_table():
    rows = [ingest.Result(database=db, devices=20, seconds=30.0, published=9000, bare_published=12000,
                          bare_received=12000, bare_rate=400.0, stored=stored, bridge_rate=rate)
            for db, stored, rate in (("PostgreSQL", 9000, 300.0), ("SQLite", 8990, 200.0))]
    pg, sqlite = headlines("ingest", ingest.report(rows, "mqtt://x:1883"))
    assert "PostgreSQL: **300 msgs/s**" in pg and "0 lost = 0.75x" in pg and "(400 msgs/s)" in pg
    assert "SQLite: **200 msgs/s**" in sqlite and "10 lost = 0.50x" in sqlite


def test_swap_headline_from_its_own_table():
    summary = {"p50": 1.0, "max": 9.0}
    phases = {"steady": {"requests": 900, "failed": 0, **summary, "p99": 2.0},
              "during": {"requests": 300, "failed": 0, **summary, "p99": 5.0}}
    bystander = {"steady": {**phases["steady"], "p99": 1.0}, "during": {**phases["during"], "failed": 2, "p99": 9.0}}
    result = {"swaps": 100, "clients": 2, "released": 100, "interval": 0.02, "swap_ms": {"p50": 30.0},
              **phases, "bystander": bystander, "failed_total": 2, "requests_total": 3000}
    (line,) = headlines("swap", swap.report(result))
    assert "**2 failed** of 2,400" in line and "**2.50x**" in line  # failures of either model; p99 of the swapped


def test_serving_headline_from_its_own_table():
    def modes(raw: float, binary: float, grpc: float) -> dict:
        return {"raw": {"p50": raw, "p99": raw * 2}, "rest-binary": {"p50": binary, "p99": binary * 2},
                "grpc": {"p50": grpc, "p99": grpc * 2}}

    out = serving.report([{"model": "digits", "queries": 500, **modes(0.1, 0.4, 0.2)},
                          {"model": "resnet50", "queries": 30, **modes(100.0, 104.0, 101.0)}])
    digits, digits_grpc, resnet, _ = headlines("serving", out)
    assert "digits rest-binary" in digits and "**4.000x**" in digits and "+0.300 ms" in digits
    assert "digits grpc" in digits_grpc and "**2.000x**" in digits_grpc
    assert "resnet50 rest-binary" in resnet and "**1.040x**" in resnet


def test_batching_headline_from_its_own_table():
    def result(clients: int, on: bool, rps: float, p99: float) -> dict:
        return {"model": "digits", "batching": "on" if on else "off", "clients": clients, "requests": int(rps * 10),
                "failed": 0, "rps": rps, "p50": p99 / 4, "p99": p99, "max": p99}

    runtime_only = [{"model": "digits", "batching": "off", "rps": 9000.0, "per_call": 1.0},
                    {"model": "digits", "batching": "on", "rps": 9900.0, "per_call": 3.5}]
    out = batching.report([result(1, False, 1000, 1.0), result(1, True, 900, 1.5),
                           result(8, False, 4000, 4.0), result(8, True, 6000, 3.0)], runtime_only, 8, 0, 2, 5)
    one, eight = headlines("batching", out)
    assert "digits, 1 client(s): **900 requests/s** batched vs 1,000 without = 0.90x" in one
    assert "digits, 8 client(s): **6,000 requests/s** batched vs 4,000 without = 1.50x; p99 3.000 ms vs 4.000 ms" in eight
    assert "| digits | on | 9,900 | 3.50 |" in out


def test_verify_headline_from_its_own_table():
    size = 100_000_000
    out = verify.render(size, [verify.Result("TUF download + verify (ModelUpdater)", 1.0),
                               verify.Result("sha256sum of the stored file", 0.25),
                               verify.Result("curl of the same URL", 0.5)])
    (line,) = headlines("verify", out)
    assert "**100.0 MB/s**" in line and "0.25x sha256sum" in line and "0.50x curl" in line


def test_footprint_headlines_for_serve_and_daemon():
    def figures(rss: float) -> dict:
        return {"rss_mb": rss, "cpu_percent": 0.1, "threads": 4}

    out = footprint.report(figures(80.0), figures(100.0), figures(60.0), 10.0, daemon=figures(110.0),
                           grpc=figures(90.0))
    serve, grpc, daemon = headlines("footprint", out)
    assert "`fleet-agent serve`" in serve and "**80.000 MiB**" in serve and "0.80x the bare imports" in serve
    assert "`fleet-agent serve --grpc`" in grpc and "0.90x" in grpc
    assert "`fleet-agent run`" in daemon and "1.10x" in daemon
    assert "RSS serve --grpc / serve: **1.12x** (+10.0 MiB for gRPC)" in out


def test_a_changed_table_is_reported_not_raised():
    (line,) = headlines("verify", "| other | columns |\n|---|---|\n| 1 | 2 |")
    assert "could not be read back" in line


def test_render_shows_every_section_failed_and_missing_runs():
    sections = [b.section for b in BENCHMARKS]
    ok = _run("verify", verify.render(1_000_000, [verify.Result("TUF download + verify (ModelUpdater)", 1.0),
                                                  verify.Result("sha256sum of the stored file", 0.5),
                                                  verify.Result("curl of the same URL", 0.5)]))
    broken = _run("fanout-10k", "", returncode=1, stderr="error: timed out\nlast simulator status: 4000 of 10000")
    text = render(MACHINE, sections, {"verify": ok, "fanout-10k": broken}, "python -m bench.run_all",
                  {"fanout-10k": "all 10,000 devices SUCCEEDED after 998 s\n"})
    assert "| CPU | Test CPU, 2 cores |" in text and "| PostgreSQL server | 15.0 |" in text and "commit abc" in text
    assert "was 3.50 on 2 cores" in text
    for section in sections:
        assert f"## {section.title}" in text and f"Reproduce: `{section.reproduce}`" in text
    assert "- 1. Fan-out, 10,000 devices: **did not complete** (exit 1); see its section for the progress" in text
    assert "last simulator status: 4000 of 10000" in text
    assert "Note (bench/notes/fanout-10k.md): all 10,000 devices SUCCEEDED after 998 s" in text
    assert "- Verification: TUF download+verify **1.0 MB/s**" in text
    assert "not run yet" in text and "python -m bench.swap --swaps 100" in text


def test_run_all_small_runs_a_subset_and_keeps_the_saved_runs(tmp_path, mosquitto_url, digits):
    runs, output = tmp_path / "runs", tmp_path / "RESULTS.md"
    (runs).mkdir()
    (runs / "verify.json").write_text(json.dumps(_run("verify", "| method |\n|---|\n| x |").__dict__))
    done = subprocess.run([sys.executable, "-m", "bench.run_all", "--small", "--only", "footprint",
                           "--runs-dir", str(runs), "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = Run.load(runs / "footprint.json")
    assert saved.ok and saved.size == "small" and "--idle-seconds" in saved.command and saved.code.startswith("commit")
    assert saved.load_peak is not None and saved.load_peak >= 0
    text = output.read_text()
    assert "## 6. Agent footprint" in text and "| fleet-agent serve, digits loaded |" in text
    assert "Idle footprint, `fleet-agent run` with digits:" in text
    assert "## 5. Verification" in text and "| x |" in text  # the saved run of another benchmark is kept
    assert "10,000 devices" not in text  # not part of a --small run
