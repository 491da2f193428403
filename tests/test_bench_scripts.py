"""The runtime benchmarks in bench/ run end to end at tiny sizes (smoke tests: no timing asserts)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def run(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def cache(digits, model_cache) -> str:
    return str(model_cache)  # the digits fixture made sure the model is there


def test_swap_script(cache):
    out = run("bench.swap", "--swaps", "5", "--clients", "2", "--steady-seconds", "0.3", "--interval", "0.01",
              "--cache", cache)
    assert "| digits (swapped): in flight during a swap |" in out and "| bystander (not swapped): steady state |" in out
    assert "requests failed in the whole run: **0**" in out and "5/5 old sessions released" in out


def test_serving_script(cache):
    out = run("bench.serving", "--models", "digits", "--queries", "20", "--cache", cache)
    assert "| digits | raw | 20 |" in out and "| digits | rest-binary | 20 |" in out and "| digits | rest-json | 20 |" in out
    assert "| digits | grpc | 20 |" in out  # the dev install has the grpc extra


def test_footprint_script(cache, mosquitto_url):
    out = run("bench.footprint", "--idle-seconds", "0.3", "--requests", "3", "--cache", cache, "--broker", mosquitto_url)
    assert "fleet-agent serve, digits loaded" in out and "RSS agent / bare imports" in out
    assert "| fleet-agent run (daemon: MQTT connected, digits active) |" in out and "RSS daemon / bare imports" in out


def test_batching_script(cache):
    out = run("bench.batching", "--seconds", "0.2", "--rounds", "1", "--models", "digits", "--cache", cache)
    assert "| digits | 8 | on (max 8, 0 µs) |" in out and "| digits | 1 | off |" in out
    assert "digits, 8 client(s): batching gives" in out and "| digits | on |" in out
