"""The README's first command: the demo runs the whole story and exits 0 only when it went as it should."""
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(model_cache):
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--devices", "8", "--api-port", str(free_port()),
         "--broker-port", str(free_port()), "--model-cache", str(model_cache)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "digits-1.0.0 SUCCEEDED" in output
    assert "golden set failed" in output and "regresses past" in output
    assert "all steps went as expected" in output
