"""fleetctl deploy / apply / rollout against a real controller API (uvicorn, SQLite and
PostgreSQL), with the engine stepping the rollout in between."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner

from edgefleet.common.protocol import ExecutionState as E
from edgefleet.controller.cli import main
from edgefleet.controller.cli.client import ApiClient
from edgefleet.controller.db.models import AuditEntry, Rollout
from edgefleet.controller.errors import InvalidInput
from edgefleet.controller.rollout import engine
from tests.rollout_fleet import RecordingPublisher, seed
from tests.support.api_server import running_controller
from tests.test_engine import say

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def api(tmp_path, database_url):
    with running_controller(tmp_path / "home", database_url) as running:
        seed(running.db)
        yield running


def fleetctl(api, *args: str, ok: bool = True):
    result = CliRunner().invoke(main, [*args, "--controller", api.url, "--token", api.token])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_dry_run_prints_the_plan_and_changes_nothing(api):
    result = fleetctl(api, "deploy", "digits:1.1.0", "--to", "site in (berlin,paris)", "--stages", "30%,100%",
                      "--dry-run")
    out = result.output
    assert "6 device(s) in 2 stage(s)" in out and "dry run: nothing was changed" in out
    assert "cpu-int8" in out and "no evidence on x86_64 yet; declared preference 1" in out
    assert "cpu-fp32" in out and "1 (30%)" in out and "2 (100%)" in out
    with api.db.unit_of_work() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Rollout)) == 0


def test_deploy_status_and_controls(api):
    result = fleetctl(api, "deploy", "digits:1.1.0", "--to", "site in (berlin,paris)", "--stages", "30%,100%",
                      "--bake", "0s", "--name", "canary-1", "--max-failure-rate", "10%")
    assert "rollout canary-1 created" in result.output
    publisher = RecordingPublisher()
    engine.step_all(api.db, publisher)
    for desired in publisher.sent:
        say(api.db, desired.device, E.SUCCEEDED, "canary-1", desired.generation)
    engine.step_all(api.db, publisher)
    engine.step_all(api.db, publisher)
    status = fleetctl(api, "rollout", "status", "canary-1").output
    assert "canary-1  digits:1.1.0  RUNNING  stage 2/2 (100%)" in status
    assert "[####################]  1/1" in status and "[--------------------]  0/2" in status
    assert "failure_rate" in status and "0.0%" in status and "10.0%" in status and "PASS" in status
    data = json.loads(fleetctl(api, "rollout", "status", "canary-1", "--format", "json").output)
    assert data["progress"][0]["classes"]["rpi-4"] == {"total": 1, "done": 1, "states": {"SUCCEEDED": 1}}
    assert {g["gate"] for g in data["gates"]} == {"failure_rate", "p99_regression", "error_rate", "confidence_shift"}
    listed = json.loads(fleetctl(api, "rollout", "list", "--format", "json").output)
    assert [(r["id"], r["state"], r["devices"]) for r in listed] == [("canary-1", "RUNNING", 6)]
    fleetctl(api, "rollout", "pause", "canary-1")
    assert "PAUSED" in fleetctl(api, "rollout", "status", "canary-1").output
    refused = fleetctl(api, "rollout", "pause", "canary-1", ok=False)
    assert refused.exit_code == 1 and "error: rollout is PAUSED; cannot pause it" in refused.output
    fleetctl(api, "rollout", "resume", "canary-1")
    assert "ROLLED_BACK" in fleetctl(api, "rollout", "rollback", "canary-1").output
    with api.db.unit_of_work() as session:
        actions = [a for (a,) in session.execute(sa.select(AuditEntry.action).order_by(AuditEntry.id))]
    assert actions == ["rollout.create", "rollout.pause", "rollout.resume", "rollout.rollback"]


def test_failed_gate_shows_in_status(api):
    fleetctl(api, "deploy", "digits:1.1.0", "--to", "hw.class=rpi-4", "--stages", "100%", "--name", "bad-1")
    publisher = RecordingPublisher()
    engine.step_all(api.db, publisher)
    for desired in publisher.sent:
        say(api.db, desired.device, E.ROLLED_BACK, "bad-1", desired.generation)
    engine.step_all(api.db, publisher)
    status = fleetctl(api, "rollout", "status", "bad-1").output
    assert "FAILED" in status and "failure_rate on rpi-4: 1 (limit 0.02) FAIL" in status
    assert "100.0%" in status and "FAIL" in status
    watched = fleetctl(api, "rollout", "status", "bad-1", "--watch", "--interval", "0.2", ok=False)
    assert watched.output == status  # a finished rollout: one view, then the watch ends
    assert watched.exit_code == 3  # FAILED
    assert "cloud rollback" not in status  # they rolled back on their own; only told to stay there


def test_apply_manifest(api, tmp_path):
    manifest = yaml.safe_load((REPO / "manifests" / "rollout.yaml").read_text())
    manifest["spec"]["selector"] = "hw.class=x86_64"
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert "dry run" in fleetctl(api, "apply", "-f", str(path), "--dry-run").output
    assert f"rollout {manifest['metadata']['name']} created" in fleetctl(api, "apply", "-f", str(path)).output
    again = fleetctl(api, "apply", "-f", str(path), ok=False)
    assert again.exit_code == 1 and "exists; choose another name" in again.output
    manifest["metadata"]["name"] = "second"
    path.write_text(yaml.safe_dump(manifest))
    overlap = fleetctl(api, "apply", "-f", str(path), ok=False)
    assert overlap.exit_code == 1 and "already in active rollout(s) digits-1-1-0-berlin" in overlap.output
    manifest["spec"]["gates"]["max_latency"] = 3
    path.write_text(yaml.safe_dump(manifest))
    bad = fleetctl(api, "apply", "-f", str(path), ok=False)
    assert bad.exit_code == 1 and f"error: {path}: $.spec.gates.max_latency: unknown field" in bad.output


@pytest.mark.parametrize("args, message", [
    (["--to", "site=mars"], "selector 'site=mars' matches no device; no rollout created"),
    (["--to", "site=(x"], "selector 'site=(x': expected a value at position 6"),
    (["--to", "site=berlin", "--stages", "50%,20%,100%"], "stages must increase: 20% follows 50%"),
    (["--to", "site=berlin", "--stages", "5%,50%"], "stages must end at 100%"),
    (["--to", "site=berlin", "--max-failure-rate", "150%"], "max_failure_rate 1.5 is out of range"),
    (["--to", "site=berlin", "--bake", "soon"], "--bake 'soon' is not a duration"),
])
def test_deploy_bad_input_is_one_line(api, args, message):
    result = fleetctl(api, "deploy", "digits:1.1.0", *args, ok=False)
    assert result.exit_code == 1 and message in result.output
    assert result.output.count("\n") == 1


def rollout_count(api) -> int:
    with api.db.unit_of_work() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Rollout))


@pytest.mark.parametrize("cron, message", [
    ("61 25 * * *", "error: --window '61 25 * * *': minute 61 is out of range 0-59"),
    ("0 2 * * MON-FRY", "error: --window '0 2 * * MON-FRY': day-of-week 'FRY' in 'MON-FRY' is not a number 0-7 or a name SUN-SAT"),
    ("0 0 30 2 *", "error: --window '0 0 30 2 *' never fires: no day 30 exists in month 2"),
])
def test_deploy_refuses_a_window_the_agent_could_not_parse(api, cron, message):
    result = fleetctl(api, "deploy", "digits:1.1.0", "--to", "site=berlin", "--window", cron,
                      "--window-duration", "2h", ok=False)
    assert result.exit_code == 1 and result.output == message + "\n"
    assert rollout_count(api) == 0


def test_deploy_takes_day_names_and_devices_get_them(api):
    fleetctl(api, "deploy", "digits:1.1.0", "--to", "site=berlin", "--stages", "100%", "--name", "weekdays",
             "--window", "30 1 * * mon-fri", "--window-duration", "2h")
    publisher = RecordingPublisher()  # re-parses every desired state as the agent will
    engine.step_all(api.db, publisher)
    assert publisher.sent and {d.window and d.window.cron for d in publisher.sent} == {"30 1 * * mon-fri"}


def test_api_refuses_a_bad_window_in_a_manifest(api):
    """The route `fleetctl apply` posts to, called directly (a client that skips the local check)."""
    manifest = yaml.safe_load((REPO / "manifests" / "rollout.yaml").read_text())
    manifest["spec"]["window"]["cron"] = "0 2 31 APR *"
    client = ApiClient(api.url, api.token)
    try:
        with pytest.raises(InvalidInput) as info:
            client.post("/v1/rollouts", {"manifest": manifest, "dry_run": False})
    finally:
        client.close()
    assert str(info.value) == "manifest: $.spec.window.cron '0 2 31 APR *' never fires: no day 31 exists in month 4"
    assert rollout_count(api) == 0
