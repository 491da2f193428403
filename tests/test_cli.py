"""fleetctl init / devices / models / audit against a real API server (CliRunner, and one real process)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from edgefleet.common.protocol import ExecutionState, ModelRef, ModelStatus, Reported
from edgefleet.controller.api.app import create_app
from edgefleet.controller.api.deps import ApiContext
from edgefleet.controller.cli import main
from edgefleet.controller.cli.devices import parse_labels
from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.db.models import ApiToken
from edgefleet.controller.db.session import Database
from edgefleet.controller.errors import InvalidInput
from edgefleet.controller.ingest import Ingest
from edgefleet.controller.store import open_store
from edgefleet.controller.tokens import hash_token
from tests.conftest import free_port
from tests.support.api_server import serve


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """`fleetctl init` in a fresh home, and the API serving that home; yields the CLI environment."""
    home = tmp_path_factory.mktemp("cli") / "home"
    env = {"EDGEFLEET_HOME": str(home)}
    result = CliRunner().invoke(main, ["init"], env=env)
    assert result.exit_code == 0, result.output
    config = ControllerConfig.load(home)
    db = Database(config.effective_database_url)
    with serve(create_app(ApiContext(config=config, db=db, store=open_store(config)))) as url:
        yield {**env, "EDGEFLEET_CONTROLLER": url}
    db.dispose()


def fleetctl(env: dict, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def one_line_error(env: dict, *args: str) -> str:
    lines = fleetctl(env, *args, code=1).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_init_creates_an_owner_only_home_and_database_whatever_the_umask(tmp_path):
    home = tmp_path / "home"
    done = subprocess.run(  # umask 0: before, the home was 0755 and controller.db 0644 under umask 022
        [sys.executable, "-c", "import os; os.umask(0); from edgefleet.controller.cli import main; main()", "init"],
        env={**os.environ, "EDGEFLEET_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in home.glob("controller.db*")}
    assert modes.get("controller.db") == 0o600 and set(modes.values()) == {0o600}, modes


def test_init_writes_a_private_operator_token_and_refuses_to_run_twice(fleet):
    token_file = os.path.join(fleet["EDGEFLEET_HOME"], "operator-token")
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    with open(token_file) as f:
        assert f.read().startswith("efo_")
    assert "already a fleet home" in one_line_error(fleet, "init")


def test_init_force_revokes_the_previous_token(tmp_path):
    env = {"EDGEFLEET_HOME": str(tmp_path / "home")}
    fleetctl(env, "init")
    first = (tmp_path / "home" / "operator-token").read_text().strip()
    fleetctl(env, "init", "--force", "--yes")
    second = (tmp_path / "home" / "operator-token").read_text().strip()
    db = Database(f"sqlite:///{tmp_path / 'home' / 'controller.db'}")
    with db.unit_of_work() as session:
        revoked = dict(session.execute(sa.select(ApiToken.token_hash, ApiToken.revoked_at)).all())
    db.dispose()
    assert revoked[hash_token(first)] is not None and revoked[hash_token(second)] is None


def test_device_commands_round_trip(fleet):
    issued = json.loads(fleetctl(fleet, "devices", "enroll", "cli-1", "--label", "site=berlin", "--ttl", "2h",
                                 "--format", "json"))
    assert issued["device_id"] == "cli-1" and issued["token"].startswith("efe_")
    human = fleetctl(fleet, "devices", "enroll", "cli-2")
    assert "fleet-agent enroll --controller" in human

    listed = json.loads(fleetctl(fleet, "devices", "list", "--format", "json"))
    assert [(d["id"], d["labels"]) for d in listed] == [("cli-1", {"site": "berlin"}), ("cli-2", {})]
    table = fleetctl(fleet, "devices", "list", "--selector", "site=berlin").splitlines()
    assert table[0].split() == ["ID", "ONLINE", "ENROLLED", "HARDWARE_CLASS", "ACTIVE", "LABELS", "LAST_SEEN"]
    assert [line.split()[0] for line in table[1:]] == ["cli-1"]

    fleetctl(fleet, "devices", "label", "cli-1", "ring=canary", "site-")
    shown = fleetctl(fleet, "devices", "show", "cli-1")
    assert "labels:" in shown and "ring=canary" in shown and "berlin" not in shown

    assert fleetctl(fleet, "devices", "remove", "cli-2", "--yes").strip() == "removed cli-2"
    assert "cli-2" in one_line_error(fleet, "devices", "show", "cli-2")

    audit = json.loads(fleetctl(fleet, "audit", "--target", "cli-1", "--format", "json"))
    assert [a["action"] for a in audit] == ["device.label", "device.enroll-token"]
    assert all(a["actor"] == "operator:admin" for a in audit)


def test_devices_list_and_show_every_model_a_device_serves(fleet):
    fleetctl(fleet, "devices", "enroll", "cli-3")
    report = Reported(device="cli-3", boot=1, seq=1, models=(
        ModelStatus(model="digits", generation=0, memory_kb=20480,
                    active=ModelRef(model="digits", version="1.0.0", variant="cpu-fp32", release=1)),
        ModelStatus(model="ocr-cls", generation=0, active=ModelRef(model="ocr-cls", version="2", variant="cpu-int8")),
        ModelStatus(model="asr", generation=0, outcome=ExecutionState.FAILED),  # never got one running
    ))
    db = Database(ControllerConfig.load(Path(fleet["EDGEFLEET_HOME"])).effective_database_url)
    try:
        assert Ingest(db).apply([report]).applied == 1
    finally:
        db.dispose()
    try:
        listed = fleetctl(fleet, "devices", "list").splitlines()
        assert "digits 1.0.0 cpu-fp32, ocr-cls 2 cpu-int8" in next(line for line in listed if line.startswith("cli-3"))
        shown = fleetctl(fleet, "devices", "show", "cli-3").splitlines()
        models = shown.index("models:")
        assert [line.split() for line in shown[models + 1:models + 4]] == [
            ["MODEL", "VERSION", "VARIANT", "RELEASE", "MEMORY_KB"],
            ["digits", "1.0.0", "cpu-fp32", "1", "20480"], ["ocr-cls", "2", "cpu-int8", "0", "-"]]
    finally:
        fleetctl(fleet, "devices", "remove", "cli-3", "--yes")


def test_models_commands(fleet):
    assert json.loads(fleetctl(fleet, "models", "list", "--format", "json")) == []
    assert "MODEL" in fleetctl(fleet, "models", "list")
    assert "fleetctl models list" in one_line_error(fleet, "models", "show", "nope")


@pytest.mark.parametrize("args, words", [
    (["devices", "label", "cli-x", "novalue"], "key=value"),
    (["devices", "enroll", "cli-x", "--ttl", "soon"], "--ttl"),
    (["devices", "enroll", "cli-x", "--label", "bad key=x"], "label key"),
    (["devices", "show", "bad!id"], "device_id"),
])
def test_bad_arguments_are_one_line_errors(fleet, args, words):
    assert words in one_line_error(fleet, *args)


def test_unreachable_controller_and_bad_tokens(fleet, tmp_path):
    down = {**fleet, "EDGEFLEET_CONTROLLER": f"http://127.0.0.1:{free_port()}"}
    error = one_line_error(down, "devices", "list")
    assert "cannot reach the controller at" in error and "fleetctl controller run" in error
    assert "operator token is not valid" in one_line_error({**fleet, "EDGEFLEET_TOKEN": "efo_wrong"}, "audit")
    no_home = {"EDGEFLEET_HOME": str(tmp_path / "empty"), "EDGEFLEET_CONTROLLER": fleet["EDGEFLEET_CONTROLLER"]}
    assert "run `fleetctl init`" in one_line_error(no_home, "models", "list")


NOUNS = ("init", "keys", "controller", "db", "bundle", "models", "devices", "deploy", "apply", "rollout",
         "data", "audit")


def test_help_lists_every_noun():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:", 1)[1].split()
    assert [noun for noun in NOUNS if noun not in listed] == []


def test_parse_labels():
    assert parse_labels(("a=1", "b=", "c-")) == ({"a": "1", "b": ""}, ["c"])
    with pytest.raises(InvalidInput):
        parse_labels(("-",))


def test_fleetctl_as_a_real_process(fleet):
    fleetctl(fleet, "devices", "enroll", "proc-1")
    done = subprocess.run(
        [sys.executable, "-c", "from edgefleet.controller.cli import main; main()", "devices", "list", "--format", "json"],
        env={**os.environ, **fleet}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "proc-1" in {d["id"] for d in json.loads(done.stdout)}
    failed = subprocess.run(
        [sys.executable, "-c", "from edgefleet.controller.cli import main; main()", "models", "show", "nope"],
        env={**os.environ, **fleet}, capture_output=True, text=True, timeout=60,
    )
    assert failed.returncode == 1 and failed.stderr.startswith("error: model 'nope' is not published")
