"""Two controller replicas through failures, with real processes (bench/replicas.py, CI-sized).

Its own PostgreSQL cluster and its own Mosquitto with persistence (the machine's shared ones
are left alone), two `fleetctl controller run` on them, thin simulated devices. During one
three-stage rollout: the leading replica is SIGKILLed, then Mosquitto is restarted, then
PostgreSQL. The rollout completes with exactly one execution per device, every one SUCCEEDED,
and every event the devices sent is stored once the killed replica is back. The 2,000-device
run of the same scenario is a benchmark (bench/RESULTS.md), too slow for CI.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, missing, need_program


@pytest.mark.slow
def test_a_rollout_survives_a_killed_leader_a_broker_restart_and_a_database_restart(digits, model_cache):
    need_program("mosquitto", "apt-get install mosquitto")
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    done = subprocess.run([sys.executable, "-m", "bench.replicas", "--devices", "40", "--chaos",
                           "kill,broker,database", "--workers", "8", "--silent-s", "5", "--timeout", "180",
                           "--cache", str(model_cache)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    row = re.search(r"^\| 40 \| 2 \| kill, broker, database \| [\d.]+ \| [\d,]+ \| 40 \| 40 \| 0 \| "
                    r"(\d+) of (\d+) \| \d+ \| ([\d.]+) \|$", done.stdout, re.M)
    assert row, done.stdout
    assert row[1] == row[2] == "200", "every event the devices sent is stored"
    assert float(row[3]) > 0
