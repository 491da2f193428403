"""bench/fanout.py end to end with a handful of devices (a smoke test: no timing asserts).

Real processes: a dedicated Mosquitto, `fleetctl controller run`, the fleet simulator."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, need_program


@pytest.mark.slow
def test_fanout_script_rolls_out_to_a_small_fleet(digits, model_cache):
    need_program("mosquitto", "apt-get install mosquitto")
    done = subprocess.run([sys.executable, "-m", "bench.fanout", "--devices", "6", "--timeout", "120",
                           "--workers", "3", "--cache", str(model_cache)],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^\| 6 \| \d+\.\d \| \d+\.\d \| [\d,]+ \| \d+\.\d\d \|", done.stdout, re.M), done.stdout
    events = re.search(r"\| full \(real model work\) \| 1 \| (\d+) of (\d+); \d+ settled from report \|", done.stdout)
    assert events and int(events[2]) >= 6 and events[1] == events[2], done.stdout  # every event sent was stored


@pytest.mark.slow
def test_thin_fanout_accounts_for_every_event_and_the_controllers_cpu(digits, model_cache, postgres_url):
    """Thin devices over two simulator processes on PostgreSQL: every device SUCCEEDED, every event
    the devices sent stored (or settled from a report), CPU per device measured."""
    need_program("mosquitto", "apt-get install mosquitto")
    url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    done = subprocess.run([sys.executable, "-m", "bench.fanout", "--devices", "12", "--thin", "--timeout", "120",
                           "--workers", "4", "--database-url", url, "--cache", str(model_cache)],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    row = re.search(r"^\| 12 \|.*\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) of \d+ \| "
                    r"thin \(no model run, fixed benchmark\) \| 2 \| 60 of 60; 0 settled from report \|", done.stdout, re.M)
    assert row, done.stdout
    controller, _broker, simulators, database, cores = map(float, row.groups())
    assert controller > 0, "the controller's CPU time was not measured"
    assert simulators > 0 and database > 0, "the simulators' or PostgreSQL's CPU time was not measured"
    assert cores > 0
