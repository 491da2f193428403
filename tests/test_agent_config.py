"""The agent config file: every field survives a write and a read; bad files name the problem."""
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig


def test_config_round_trips_through_toml(tmp_path):
    config = AgentConfig(
        device_id="pi-7", state_dir=tmp_path, mqtt_password='quote" and \\ backslash',
        hardware_override={"arch": "aarch64", "cpu_features": ["neon", "dotprod"], "jetson": {"l4t": "36.3"}},
        heartbeat_s=2.5, allow_spinning=True,
    )
    path = tmp_path / "agent.toml"
    path.write_text(config.to_toml())
    assert AgentConfig.load(path) == config


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "x"\nheartbeat = 3\n')
    with pytest.raises(ValueError, match="unknown key.*heartbeat"):
        AgentConfig.load(path)


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot read agent config"):
        AgentConfig.load(Path(tmp_path / "missing.toml"))
