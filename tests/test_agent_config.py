"""The agent config file: every field survives a write and a read; bad files and variables are
named in one line; EDGEFLEET_AGENT_<KEY> overrides the file."""
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.batching import BatchPolicy
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtime import RuntimeOptions, batch_policy, largest_batch
from edgefleet.common.settings import ConfigError

FLEET_AGENT = str(Path(sys.executable).parent / "fleet-agent")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_config_round_trips_through_toml(tmp_path):
    config = AgentConfig(
        device_id="pi-7", state_dir=tmp_path, mqtt_password='quote" and \\ backslash',
        hardware_override={"arch": "aarch64", "cpu_features": ["neon", "dotprod"], "jetson": {"l4t": "36.3"}},
        heartbeat_s=2.5, allow_spinning=True,
    )
    assert AgentConfig.load(write(tmp_path, config.to_toml()), environ={}) == config


def test_unknown_key_is_named_with_the_likely_one(tmp_path):
    path = write(tmp_path, 'device_id = "x"\nheartbeat = 3\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) heartbeat; did you mean heartbeat_s\?"):
        AgentConfig.load(path, environ={})


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot read agent config"):
        AgentConfig.load(Path(tmp_path / "missing.toml"))


@pytest.mark.parametrize("line, problem", [
    ('heartbeat_s = "fast"', "heartbeat_s must be a number, got 'fast'"),
    ("intra_op_threads = true", "intra_op_threads must be an integer, got true"),
    ("intra_op_threads = 1.5", "intra_op_threads must be an integer, got 1.5"),
    ("allow_spinning = 1", "allow_spinning must be true or false, got 1"),
    ("state_dir = 7", "state_dir must be a path (a string), got 7"),
    ("device_id = 7", "device_id must be a string, got 7"),
    ('hardware_override = "x86"', "hardware_override must be a table, got 'x86'"),
    ("heartbeat_s = 0", "heartbeat_s must be greater than 0, got 0"),
    ("offline_queue_max = -1", "offline_queue_max must be 0 or more, got -1"),
])
def test_a_wrong_type_or_range_is_one_line_naming_file_and_key(tmp_path, line, problem):
    path = write(tmp_path, f"{line}\n")
    with pytest.raises(ConfigError) as e:
        AgentConfig.load(path, environ={})
    assert str(e.value) == f"agent config {path}: {problem}"


def test_values_take_the_field_type(tmp_path):
    config = AgentConfig.load(write(tmp_path, 'heartbeat_s = 5\nstate_dir = "/srv/agent"\n'), environ={})
    assert config.heartbeat_s == 5.0 and isinstance(config.heartbeat_s, float)
    assert config.state_dir == Path("/srv/agent")


def test_environment_beats_file_and_is_coerced_by_type(tmp_path):
    path = write(tmp_path, 'device_id = "from-file"\nheartbeat_s = 9.0\nallow_spinning = true\n')
    config = AgentConfig.load(path, environ={
        "EDGEFLEET_AGENT_HEARTBEAT_S": "2.5", "EDGEFLEET_AGENT_ALLOW_SPINNING": "false",
        "EDGEFLEET_AGENT_STATE_DIR": "/srv/agent", "EDGEFLEET_AGENT_OFFLINE_QUEUE_MAX": "7",
        "EDGEFLEET_AGENT_HARDWARE_OVERRIDE": '{arch = "aarch64", cpu_features = ["neon"]}',
        "EDGEFLEET_BROKER_URL": "mqtt://controller-only:1883",  # the controller's prefix: not the agent's
    })
    assert (config.heartbeat_s, config.allow_spinning, config.state_dir, config.offline_queue_max) == \
        (2.5, False, Path("/srv/agent"), 7)
    assert config.hardware_override == {"arch": "aarch64", "cpu_features": ["neon"]}
    assert config.device_id == "from-file"
    assert config.broker_url == AgentConfig().broker_url


@pytest.mark.parametrize("variable, value, problem", [
    ("EDGEFLEET_AGENT_HEARTBEAT_S", "fast", "must be a number, got 'fast'"),
    ("EDGEFLEET_AGENT_INTRA_OP_THREADS", "2.5", "must be an integer, got '2.5'"),
    ("EDGEFLEET_AGENT_ALLOW_SPINNING", "yes", "must be true or false, got 'yes'"),
    ("EDGEFLEET_AGENT_OFFLINE_QUEUE_MAX", "-3", "must be 0 or more, got -3"),
])
def test_a_wrong_variable_is_named(tmp_path, variable, value, problem):
    with pytest.raises(ConfigError) as e:
        AgentConfig.load(write(tmp_path, ""), environ={variable: value})
    assert str(e.value) == f"agent config: {variable} {problem}; fix or unset the variable"


def test_toml_syntax_error_names_file_line_and_column_and_never_suggests_init(tmp_path):
    path = write(tmp_path, 'device_id = "x"\nheartbeat_s = \n')
    with pytest.raises(ConfigError) as e:
        AgentConfig.load(path, environ={})
    message = str(e.value)
    assert message.startswith(f"agent config {path}: invalid TOML: ")
    assert "line 2, column 15" in message and message.endswith("fix the file")
    assert "--force" not in message


def run_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FLEET_AGENT, *args], check=False, capture_output=True, text=True, timeout=60, env=env)


def test_fleet_agent_run_with_a_bad_config_exits_with_one_line(tmp_path):
    path = write(tmp_path, f'device_id = "x"\nstate_dir = "{tmp_path}"\nheartbeat_s = "fast"\n')
    done = run_agent("run", "--config", str(path))
    assert done.returncode == 1
    assert done.stderr == f"error: agent config {path}: heartbeat_s must be a number, got 'fast'\n"


def test_fleet_agent_run_names_a_bad_variable(tmp_path):
    path = write(tmp_path, f'device_id = "x"\nstate_dir = "{tmp_path}"\n')
    done = run_agent("run", "--config", str(path), env={"EDGEFLEET_AGENT_SERVE": "127.0.0.1:0",
                                                        "EDGEFLEET_AGENT_RECONNECT_MAX_S": "soon"})
    assert done.returncode == 1
    assert done.stderr == ("error: agent config: EDGEFLEET_AGENT_RECONNECT_MAX_S must be a number, "
                           "got 'soon'; fix or unset the variable\n")


def test_fleet_agent_run_help_lists_the_variables_and_the_precedence():
    done = run_agent("run", "--help")
    assert "flag > environment > agent.toml > default" in done.stdout
    for variable in ("EDGEFLEET_AGENT_HEARTBEAT_S", "EDGEFLEET_AGENT_STATE_DIR", "EDGEFLEET_AGENT_HARDWARE_OVERRIDE"):
        assert variable in done.stdout


def test_batching_is_per_model_over_the_agent_wide_default(tmp_path):
    path = write(tmp_path, 'max_batch_size = 4\nmax_queue_delay_us = 100\n'
                           'model_batching = {textdir = {max_batch_size = 16}, detector = {max_batch_size = 0}}\n')
    config = AgentConfig.load(path, environ={})
    assert batch_policy(config, "textdir") == BatchPolicy(16, 100)  # its own size, the default delay
    assert batch_policy(config, "digits") == BatchPolicy(4, 100)    # no entry: the agent-wide settings
    assert batch_policy(config, "detector") is None                 # batching off for this model only
    assert largest_batch(config) == 16                               # the server's body limit follows it
    assert RuntimeOptions.from_config(config, model="textdir").batching == BatchPolicy(16, 100)


@pytest.mark.parametrize("entry, error", [
    ('{max_batch = 8}', "model_batching.digits must be a table of max_batch_size and max_queue_delay_us"),
    ('{max_batch_size = "8"}', "model_batching.digits.max_batch_size must be an integer of 0 or more, got '8'"),
    ('{max_queue_delay_us = -1}', "model_batching.digits.max_queue_delay_us must be an integer of 0 or more"),
])
def test_a_bad_model_batching_entry_stops_the_agent_at_start_in_one_line(tmp_path, entry, error):
    path = write(tmp_path, AgentConfig(device_id="d1", state_dir=tmp_path / "state").to_toml().replace(
        "model_batching = {}", f"model_batching = {{digits = {entry}}}"))
    done = subprocess.run([FLEET_AGENT, "run", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert error in done.stderr
