"""fleetctl as scripts use it, against a real controller API (uvicorn, SQLite): the exit code of
`rollout status --watch` for each final state and for --timeout, the bake countdown, rollouts that
require data (--min-samples), and the questions destructive commands ask unless --yes."""
from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from click.testing import CliRunner

from edgefleet.common.protocol import ExecutionState as E
from edgefleet.controller.cli import main
from edgefleet.controller.db.models import Device, utcnow
from edgefleet.controller.rollout import engine
from tests.rollout_fleet import RecordingPublisher, seed
from tests.support.api_server import running_controller
from tests.test_engine import say

FLEETCTL = [sys.executable, "-c", "from edgefleet.controller.cli import main; main()"]


@pytest.fixture
def api(tmp_path):
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}") as running:
        seed(running.db)
        yield running


def fleetctl(api, *args: str, answer: str | None = None):
    return CliRunner().invoke(main, [*args, "--controller", api.url, "--token", api.token], input=answer)


def deploy(api, name: str, *extra: str) -> None:
    result = fleetctl(api, "deploy", "digits:1.1.0", "--to", "site in (berlin,paris)", "--stages", "100%",
                      "--name", name, *extra)
    assert result.exit_code == 0, result.output


def watch(api, name: str, *extra: str):
    return fleetctl(api, "rollout", "status", name, "--watch", "--interval", "0.2", *extra)


def settle(api, publisher: RecordingPublisher, rollout: str, state: E) -> None:
    """Every device told about ``rollout`` so far reports ``state``; then the engine steps."""
    for desired in publisher.sent:
        if desired.deployment == rollout:
            say(api.db, desired.device, state, rollout, desired.generation)
    engine.step_all(api.db, publisher)


def test_watch_exits_with_a_code_per_final_state(api):
    publisher = RecordingPublisher()
    deploy(api, "r-abort")
    assert fleetctl(api, "rollout", "abort", "r-abort").exit_code == 0
    assert watch(api, "r-abort").exit_code == 4

    deploy(api, "r-rollback")
    engine.step_all(api.db, publisher)
    assert fleetctl(api, "rollout", "rollback", "r-rollback").exit_code == 0
    assert watch(api, "r-rollback").exit_code == 5

    deploy(api, "r-old", "--bake", "1h")
    engine.step_all(api.db, publisher)
    settle(api, publisher, "r-old", E.SUCCEEDED)
    baking = watch(api, "r-old", "--timeout", "0.5s")
    assert baking.exit_code == 124, baking.output
    assert "bake: 59m" in baking.output and "left of 1h00m00s" in baking.output
    assert "error: rollout r-old is still RUNNING at stage 1/1 after --timeout 0s" in baking.output

    deploy(api, "r-new", "--supersede", "--bake", "0s")
    assert watch(api, "r-old").exit_code == 6
    engine.step_all(api.db, publisher)
    settle(api, publisher, "r-new", E.SUCCEEDED)
    done = watch(api, "r-new")
    assert done.exit_code == 0, done.output
    assert "SUCCEEDED  stage 1/1 (100%)" in done.output


def test_watch_follows_a_rollout_until_it_fails(api):
    """A real `fleetctl` process watches while the stage's devices fail: exit code 3 (FAILED)."""
    publisher = RecordingPublisher()
    deploy(api, "r-fail", "--bake", "0s")
    engine.step_all(api.db, publisher)
    watcher = subprocess.Popen([*FLEETCTL, "rollout", "status", "r-fail", "--watch", "--interval", "0.2",
                                "--controller", api.url, "--token", api.token],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert "RUNNING  stage 1/1" in watcher.stdout.readline()  # the first view: it is watching
        settle(api, publisher, "r-fail", E.FAILED)
        assert watcher.wait(30) == 3
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert "FAILED" in watcher.stdout.read()


def test_min_samples_holds_a_stage_without_data_then_fails_it_at_the_deadline(api):
    publisher = RecordingPublisher()
    deploy(api, "needs-data", "--bake", "0s", "--min-samples", "5", "--device-timeout", "10m")
    engine.step_all(api.db, publisher)
    settle(api, publisher, "needs-data", E.SUCCEEDED)
    waiting = fleetctl(api, "rollout", "status", "needs-data").output
    assert "RUNNING" in waiting, waiting
    assert "waiting for evidence: failure_rate on rpi-4: 0 (3 of 5 samples) (limit 0.02) NO_DATA" in waiting
    assert "error_rate on x86_64: no data (0 of 5 samples)" in waiting
    engine.step_all(api.db, publisher, now=utcnow() + timedelta(minutes=11))
    failed = fleetctl(api, "rollout", "status", "needs-data")
    assert "FAILED" in failed.output and "no data by the stage deadline (600s after its devices finished)" \
        in failed.output
    assert "NO_DATA" in failed.output  # the gates table shows which gates had no data


def test_destructive_commands_ask_unless_yes(api, tmp_path):
    refused = fleetctl(api, "devices", "remove", "x1", answer="n\n")
    assert refused.exit_code == 1
    assert "Remove device x1?" in refused.output
    assert refused.output.strip().endswith("error: not confirmed: nothing was changed (pass --yes to skip the question)")
    with api.db.unit_of_work() as session:
        assert session.get(Device, "x1") is not None
    assert fleetctl(api, "devices", "remove", "x1", answer="y\n").exit_code == 0
    assert fleetctl(api, "devices", "remove", "x2", "--yes").output == "removed x2\n"
    with api.db.unit_of_work() as session:
        assert session.get(Device, "x1") is None and session.get(Device, "x2") is None

    env = {"EDGEFLEET_HOME": str(tmp_path / "other")}
    runner = CliRunner()
    assert runner.invoke(main, ["init"], env=env).exit_code == 0
    token = (tmp_path / "other" / "operator-token").read_text()
    closed = runner.invoke(main, ["init", "--force"], env=env)  # no terminal to ask: refused
    assert closed.exit_code == 1 and "not confirmed" in closed.output
    assert (tmp_path / "other" / "operator-token").read_text() == token
    downgrade = runner.invoke(main, ["db", "downgrade", "base"], env=env, input="n\n")
    assert downgrade.exit_code == 1 and "Tables and data newer than it are dropped" in downgrade.output
    assert runner.invoke(main, ["db", "current", "--format", "json"], env=env).output.count('"up_to_date": true') == 1
    assert runner.invoke(main, ["init", "--force", "--yes"], env=env).exit_code == 0
    assert (tmp_path / "other" / "operator-token").read_text() != token
