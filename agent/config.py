"""Agent configuration: one dataclass, read from ``agent.toml``."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgefleet.common.defaults import (
    DEFAULT_BROKER_URL,
    DEFAULT_CONTROLLER_URL,
    DEFAULT_SERVE_ADDRESS,
    DEFAULT_STATE_DIR,
)


@dataclass
class AgentConfig:
    device_id: str = ""
    state_dir: Path = DEFAULT_STATE_DIR
    controller_url: str = DEFAULT_CONTROLLER_URL
    broker_url: str = DEFAULT_BROKER_URL
    mqtt_username: str = ""
    mqtt_password: str = ""
    mqtt_ca_file: str = ""                  # CA bundle for mqtts:// (empty: the system trust store)
    reconnect_min_s: float = 0.5            # broker reconnect backoff (exponential, full jitter)
    reconnect_max_s: float = 60.0
    device_token: str = ""                  # bearer token for the controller's device API
    metadata_url: str = ""                  # TUF metadata; empty: {controller_url}/repository/metadata/
    target_base_url: str = ""               # TUF targets; empty: {controller_url}/repository/targets/
    serve: str = DEFAULT_SERVE_ADDRESS      # HOST:PORT, or unix:/path/to/socket
    intra_op_threads: int = 1               # small shared devices: do not take every core
    inter_op_threads: int = 1
    allow_spinning: bool = False            # ORT busy-wait threads burn CPU on shared devices
    heartbeat_s: float = 30.0
    download_timeout_s: float = 30.0        # a stalled download is abandoned after this, resumed later
    max_request_bytes: int = 16 * 1024 * 1024
    offline_queue_max: int = 1000           # reports kept while the broker is unreachable
    sample_buffer_bytes: int = 64 * 1024 * 1024
    hardware_override: dict = field(default_factory=dict)  # simulator / tests: fake profile fields

    @property
    def tuf_metadata_url(self) -> str:
        return self.metadata_url or f"{self.controller_url.rstrip('/')}/repository/metadata/"

    @property
    def tuf_target_base_url(self) -> str:
        return self.target_base_url or f"{self.controller_url.rstrip('/')}/repository/targets/"

    @classmethod
    def load(cls, path: Path) -> "AgentConfig":
        """Read a TOML file; unknown keys are an error that names the key."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"cannot read agent config {path}: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"agent config {path}: unknown key(s) {', '.join(unknown)}")
        if "state_dir" in data:
            data["state_dir"] = Path(data["state_dir"])
        return cls(**data)

    def to_toml(self) -> str:
        return "".join(f"{f.name} = {_toml_value(getattr(self, f.name))}\n" for f in fields(self))


def _toml_value(value: object) -> str:
    """A TOML literal; JSON's string escapes are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))
