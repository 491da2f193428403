"""The shipped systemd units pass `systemd-analyze verify` and keep their hardening.

The units point at /opt/edgefleet/venv/bin (the documented install location);
verify refuses an ExecStart that does not exist, so the test verifies copies
whose ExecStart is rewritten to this venv's console scripts.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_program

REPO = Path(__file__).resolve().parent.parent
UNITS = ("fleet-agent.service", "fleet-controller.service")
SHIPPED_BIN = "/opt/edgefleet/venv/bin/"
HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
             "DynamicUser=yes", "Type=notify", "Restart=on-failure", "CapabilityBoundingSet=")


def systemd_analyze() -> str:
    return need_program("systemd-analyze", "apt-get install systemd")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened_with_a_watchdog(unit):
    text = (REPO / "systemd" / unit).read_text()
    for line in HARDENING:
        assert f"\n{line}\n" in text, f"{unit} lacks {line}"
    assert "\nWatchdogSec=" in text and "\nStateDirectory=" in text
    assert f"ExecStart={SHIPPED_BIN}" in text


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit, tmp_path):
    analyze = systemd_analyze()
    venv_bin = Path(sys.executable).parent
    text = (REPO / "systemd" / unit).read_text().replace(SHIPPED_BIN, f"{venv_bin}/")
    copy = tmp_path / unit
    copy.write_text(text)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # verify only warns (exit 0) about unknown keys or bad values: any output is a defect
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


def test_verify_catches_a_broken_unit(tmp_path):
    analyze = systemd_analyze()
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nType=notify\nExecStart=/nonexistent/fleet-agent run\nProtectSytem=strict\n")
    result = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "ProtectSytem" in result.stderr
