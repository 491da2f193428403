"""The controller's config.toml and EDGEFLEET_<KEY> variables, as `fleetctl` reads them: names,
types and ranges checked in one line; flag > environment > file > default."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefleet.controller.cli import main
from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.errors import InvalidInput


def fleetctl(home: Path, *args: str, env: dict[str, str] | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args), env={"EDGEFLEET_HOME": str(home), **(env or {})})
    assert result.exit_code == code, result.output
    return result.output


def write_config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, problem", [
    ('api_port = "abc"\n', "api_port must be an integer, got 'abc'"),
    ("api_port = true\n", "api_port must be an integer, got true"),
    ("api_port = 70000\n", "api_port must be between 1 and 65535, got 70000"),
    ("embedded_broker_port = 0\n", "embedded_broker_port must be between 1 and 65535, got 0"),
    ("scheduler_interval_s = 0\n", "scheduler_interval_s must be greater than 0, got 0"),
    ('[store]\npresign_ttl_s = "1h"\n', "store.presign_ttl_s must be an integer, got '1h'"),
    ('store = "s3"\n', "store must be a table ([store]), got 's3'"),
    ("api_prot = 8000\n", "unknown key(s) api_prot; did you mean api_port?"),
    ('[store]\nbucket_name = "b"\n', "unknown key(s) store.bucket_name; did you mean store.bucket?"),
    ('home = "/elsewhere"\n', "unknown key(s) home; remove or rename it"),  # EDGEFLEET_HOME says where HOME is
])
def test_controller_run_refuses_a_bad_config_in_one_line(tmp_path, text, problem):
    path = write_config(tmp_path / "home", text)
    output = fleetctl(tmp_path / "home", "controller", "run", code=1)
    assert output == f"error: controller config {path}: {problem}\n"


def test_toml_syntax_error_names_file_line_and_column_and_never_suggests_init(tmp_path):
    path = write_config(tmp_path / "home", 'api_host = "0.0.0.0"\napi_port = = 1\n')
    output = fleetctl(tmp_path / "home", "controller", "run", "--config", str(path), code=1)
    assert output.startswith(f"error: controller config {path}: invalid TOML: ")
    assert "line 2, column 12" in output and output.endswith("fix the file\n")
    assert "--force" not in output and len(output.splitlines()) == 1


def test_environment_beats_file_and_is_coerced_by_type(tmp_path):
    write_config(tmp_path, 'api_port = 9000\npublic_url = "http://file:9000"\n[store]\nregion = "eu-west-1"\n')
    config = ControllerConfig.load(tmp_path, environ={
        "EDGEFLEET_API_PORT": "9100", "EDGEFLEET_SCHEDULER_INTERVAL_S": "5",
        "EDGEFLEET_STORE_PRESIGN_TTL_S": "60", "EDGEFLEET_STORE_KIND": "s3",
        "EDGEFLEET_AGENT_API_HOST": "0.0.0.0",  # the agent's prefix: not the controller's
        "EDGEFLEET_HOME": "/not/a/key",
    })
    assert (config.api_port, config.scheduler_interval_s) == (9100, 5.0)
    assert isinstance(config.scheduler_interval_s, float)
    assert (config.store.presign_ttl_s, config.store.kind, config.store.region) == (60, "s3", "eu-west-1")
    assert config.public_url == "http://file:9000" and config.api_host == "127.0.0.1"
    assert config.home == tmp_path


@pytest.mark.parametrize("variable, value, problem", [
    ("EDGEFLEET_API_PORT", "abc", "must be an integer, got 'abc'"),
    ("EDGEFLEET_API_PORT", "65536", "must be between 1 and 65535, got 65536"),
    ("EDGEFLEET_STORE_PRESIGN_TTL_S", "0", "must be greater than 0, got 0"),
])
def test_a_wrong_variable_is_named(tmp_path, variable, value, problem):
    with pytest.raises(InvalidInput) as e:
        ControllerConfig.load(tmp_path, environ={variable: value})
    assert str(e.value) == f"controller config: {variable} {problem}; fix or unset the variable"


def test_database_url_flag_beats_environment_beats_file(tmp_path):
    home = tmp_path / "home"
    write_config(home, f'database_url = "sqlite:///{tmp_path}/file.db"\n')
    assert f"{tmp_path}/file.db" in fleetctl(home, "db", "upgrade")
    env = {"EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path}/env.db"}
    assert f"{tmp_path}/env.db" in fleetctl(home, "db", "upgrade", env=env)
    assert f"{tmp_path}/flag.db" in fleetctl(home, "db", "--database-url", f"sqlite:///{tmp_path}/flag.db",
                                             "upgrade", env=env)
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["env.db", "file.db", "flag.db"]


def test_controller_run_help_lists_the_variables_and_the_precedence(tmp_path):
    output = fleetctl(tmp_path, "controller", "run", "--help")
    assert "flag > environment > config.toml > default" in output
    for variable in ("EDGEFLEET_API_PORT", "EDGEFLEET_DATABASE_URL", "EDGEFLEET_STORE_PRESIGN_TTL_S"):
        assert variable in output


@pytest.mark.parametrize("text, problem", [
    ('broker_admin = "emqx"\n', 'broker_admin must be "mosquitto" or empty, not \'emqx\''),
    ('broker_admin = "mosquitto"\n', 'broker_admin = "mosquitto" needs broker_url'),
])
def test_broker_admin_is_checked_at_start(tmp_path, text, problem):
    write_config(tmp_path / "home", text)
    output = fleetctl(tmp_path / "home", "controller", "run", code=1)
    assert output.startswith("error: controller config: ") and problem in output and output.count("\n") == 1
