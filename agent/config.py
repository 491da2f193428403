"""Agent configuration: one dataclass, read from ``agent.toml``, overridden by ``EDGEFLEET_AGENT_<KEY>``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.common.defaults import (
    DEFAULT_BROKER_URL,
    DEFAULT_CONTROLLER_URL,
    DEFAULT_SERVE_ADDRESS,
    DEFAULT_STATE_DIR,
)
from edgefleet.common.settings import COUNT, POSITIVE, load, to_toml

# Distinct from the controller's EDGEFLEET_<KEY>: one shell may run both.
ENV_PREFIX = "EDGEFLEET_AGENT_"


@dataclass
class AgentConfig:
    device_id: str = ""
    state_dir: Path = DEFAULT_STATE_DIR
    controller_url: str = DEFAULT_CONTROLLER_URL
    broker_url: str = DEFAULT_BROKER_URL
    mqtt_username: str = ""
    mqtt_password: str = ""
    mqtt_ca_file: str = ""                  # CA bundle for mqtts:// (empty: the system trust store)
    mqtt_cert_file: str = ""                # client certificate for mqtts:// from the fleet CA, renewed at 2/3
    mqtt_key_file: str = ""                 # its key, made on this device (0600)
    # Broker reconnect backoff (exponential, full jitter).
    reconnect_min_s: float = field(default=0.5, metadata=POSITIVE)
    reconnect_max_s: float = field(default=60.0, metadata=POSITIVE)
    device_token: str = ""                  # bearer token for the controller's device API
    metadata_url: str = ""                  # TUF metadata; empty: {controller_url}/repository/metadata/
    target_base_url: str = ""               # TUF targets; empty: {controller_url}/repository/targets/
    serve: str = DEFAULT_SERVE_ADDRESS      # HOST:PORT, or unix:/path/to/socket
    serve_grpc: str = ""                    # OIP over gRPC too, on HOST:PORT or unix:/path (the grpc extra); "": off
    # Small shared devices: do not take every core (0: ONNX Runtime's default, one per core).
    intra_op_threads: int = field(default=1, metadata=COUNT)
    inter_op_threads: int = field(default=1, metadata=COUNT)
    allow_spinning: bool = False            # ORT busy-wait threads burn CPU on shared devices
    # Dynamic batching of concurrent requests (models with a batch dimension); 0 or 1: off.
    max_batch_size: int = field(default=0, metadata=COUNT)
    max_queue_delay_us: int = field(default=0, metadata=COUNT)  # an unfilled batch waits for its oldest to be this old
    # Per model, over the two above: {digits = {max_batch_size = 8, max_queue_delay_us = 200}}
    model_batching: dict = field(default_factory=dict)
    heartbeat_s: float = field(default=30.0, metadata=POSITIVE)
    # A stalled download is abandoned after this, resumed later.
    download_timeout_s: float = field(default=30.0, metadata=POSITIVE)
    max_request_bytes: int = field(default=16 * 1024 * 1024, metadata=POSITIVE)
    offline_queue_max: int = field(default=1000, metadata=COUNT)  # reports kept while the broker is unreachable
    sample_buffer_bytes: int = field(default=64 * 1024 * 1024, metadata=COUNT)
    hardware_override: dict = field(default_factory=dict)  # simulator / tests: fake profile fields

    @property
    def tuf_metadata_url(self) -> str:
        return self.metadata_url or f"{self.controller_url.rstrip('/')}/repository/metadata/"

    @property
    def tuf_target_base_url(self) -> str:
        return self.target_base_url or f"{self.controller_url.rstrip('/')}/repository/targets/"

    @classmethod
    def load(cls, path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
        """The TOML file at ``path``, then ``EDGEFLEET_AGENT_<KEY>`` variables (default: os.environ);
        a wrong name, type or range raises ConfigError naming the file or variable and the key."""
        return load(cls, path, "agent config", ENV_PREFIX, environ)

    def to_toml(self) -> str:
        return to_toml(self)
