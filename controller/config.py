"""Controller configuration: one dataclass, read from ``$EDGEFLEET_HOME/config.toml``."""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgefleet.common.defaults import (
    DEFAULT_CONTROLLER_URL,
    EMBEDDED_BROKER_HOST,
    EMBEDDED_BROKER_PORT,
    fleet_home,
)

from .errors import InvalidInput


@dataclass
class StoreConfig:
    kind: str = "local"              # "local" or "s3"
    path: str = ""                   # local: directory (default HOME/store)
    bucket: str = ""                 # s3
    prefix: str = ""                 # s3: key prefix inside the bucket
    endpoint_url: str = ""           # s3-compatible stores (MinIO, moto, Ceph)
    region: str = "us-east-1"
    presign_ttl_s: int = 3600        # lifetime of presigned download URLs


@dataclass
class ControllerConfig:
    home: Path = field(default_factory=fleet_home)
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    public_url: str = DEFAULT_CONTROLLER_URL   # how devices reach the API and repository
    database_url: str = ""           # default: sqlite:///HOME/controller.db (WAL)
    broker_url: str = ""             # empty: start the embedded broker on 127.0.0.1:embedded_broker_port
    embedded_broker_port: int = EMBEDDED_BROKER_PORT
    mqtt_username: str = ""
    mqtt_password: str = ""
    share_group: str = ""            # MQTT 5 shared-subscription group of this fleet's replicas (see below)
    store: StoreConfig = field(default_factory=StoreConfig)
    timestamp_expiry_s: int = 86400        # lifetime of a signed timestamp
    snapshot_expiry_s: int = 7 * 86400
    resign_margin_s: int = 6 * 3600        # re-sign when less than this is left
    heartbeat_timeout_s: int = 90          # no heartbeat for this long: offline
    telemetry_retention_days: int = 30
    scheduler_interval_s: float = 2.0      # rollout stepping and sweeps
    max_upload_bytes: int = 32 * 1024 * 1024

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"mqtt://{EMBEDDED_BROKER_HOST}:{self.embedded_broker_port}"

    @property
    def effective_share_group(self) -> str:
        """Replicas of one fleet split the load; two fleets on one broker must not, or each
        would ingest half of the other's messages. Default: one group per fleet home path."""
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:8]
        return self.share_group or f"edgefleet-{digest}"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'controller.db'}"

    @property
    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.home / "store"

    @classmethod
    def load(cls, home: Path | None = None, path: Path | None = None) -> "ControllerConfig":
        """Defaults, overridden by ``path`` (default HOME/config.toml) when it exists."""
        home = home or fleet_home()
        path = path or home / "config.toml"
        data: dict = {}
        if path.exists():
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise InvalidInput(f"{path}: {e}; fix the file or run `fleetctl init --force`") from None
        return cls.from_dict(data, home=home, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, home: Path, source: str = "config") -> "ControllerConfig":
        data = dict(data)
        store = data.pop("store", {})
        _reject_unknown(cls, data, source)
        _reject_unknown(StoreConfig, store, f"{source} [store]")
        return cls(home=home, store=StoreConfig(**store), **data)


def _reject_unknown(kind: type, data: dict, source: str) -> None:
    known = {f.name for f in fields(kind)} - {"home", "store"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"{source}: unknown key(s) {', '.join(unknown)}; see docs for the valid keys")
