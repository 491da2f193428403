"""Controller configuration: one dataclass, read from ``$EDGEFLEET_HOME/config.toml``,
overridden by ``EDGEFLEET_<KEY>`` (``[store]`` keys: ``EDGEFLEET_STORE_<KEY>``)."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.common.defaults import (
    DEFAULT_CONTROLLER_URL,
    EMBEDDED_BROKER_HOST,
    EMBEDDED_BROKER_PORT,
    fleet_home,
)
from edgefleet.common.settings import COUNT, FIXED, PORT, POSITIVE, ConfigError, load

from .errors import InvalidInput

BROKER_ADMINS = ("", "mosquitto")

ENV_PREFIX = "EDGEFLEET_"  # EDGEFLEET_HOME, the fleet home, is no key: it says where config.toml is


@dataclass
class StoreConfig:
    kind: str = "local"              # "local" or "s3"
    path: str = ""                   # local: directory (default HOME/store)
    bucket: str = ""                 # s3
    prefix: str = ""                 # s3: key prefix inside the bucket
    endpoint_url: str = ""           # s3-compatible stores (MinIO, moto, Ceph)
    region: str = "us-east-1"
    presign_ttl_s: int = field(default=3600, metadata=POSITIVE)  # lifetime of presigned download URLs


@dataclass
class ControllerConfig:
    home: Path = field(default_factory=fleet_home, metadata=FIXED)
    api_host: str = "127.0.0.1"
    api_port: int = field(default=8470, metadata=PORT)
    public_url: str = DEFAULT_CONTROLLER_URL   # how devices reach the API and repository
    database_url: str = ""           # default: sqlite:///HOME/controller.db (WAL)
    broker_url: str = ""             # empty: start the embedded broker on 127.0.0.1:embedded_broker_port
    embedded_broker_port: int = field(default=EMBEDDED_BROKER_PORT, metadata=PORT)
    mqtt_username: str = ""
    mqtt_password: str = ""
    # TLS client identity of the controller (mqtts://; `fleetctl broker config mosquitto` writes them)
    mqtt_ca_file: str = ""           # trust anchors for the broker's certificate; empty: the system store
    mqtt_cert_file: str = ""         # the controller's client certificate
    mqtt_key_file: str = ""          # and its key
    broker_admin: str = ""           # "mosquitto": admit and revoke devices through its dynamic-security plugin
    device_cert_lifetime_s: int = field(default=30 * 86400, metadata=POSITIVE)  # devices renew at 2/3
    share_group: str = ""            # MQTT 5 shared-subscription group of this fleet's replicas (see below)
    # default: edgefleet-controller-HOST-<hash of home>; replicas that share a host and a home set one each
    mqtt_client_id: str = ""
    store: StoreConfig = field(default_factory=StoreConfig)
    timestamp_expiry_s: int = field(default=86400, metadata=POSITIVE)  # lifetime of a signed timestamp
    snapshot_expiry_s: int = field(default=7 * 86400, metadata=POSITIVE)
    resign_margin_s: int = field(default=6 * 3600, metadata=COUNT)  # re-sign when less than this is left
    heartbeat_timeout_s: float = field(default=90, metadata=POSITIVE)  # no heartbeat for this long: offline
    telemetry_retention_days: int = field(default=30, metadata=POSITIVE)
    scheduler_interval_s: float = field(default=2.0, metadata=POSITIVE)  # rollout stepping and sweeps
    # a sent execution silent this long has its device's retained report read again (sweep: twice as often)
    report_reread_s: float = field(default=30.0, metadata=POSITIVE)
    max_upload_bytes: int = field(default=32 * 1024 * 1024, metadata=POSITIVE)

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
    def load(cls, home: Path | None = None, path: Path | None = None,
             environ: Mapping[str, str] | None = None) -> ControllerConfig:
        """Defaults, then ``path`` (default HOME/config.toml) when it exists, then ``EDGEFLEET_<KEY>``
        variables (default: os.environ). A wrong name, type or range is InvalidInput."""
        home = home or fleet_home()
        path = path or home / "config.toml"
        try:
            config = load(cls, path if path.exists() else None, "controller config", ENV_PREFIX, environ, home=home)
        except ConfigError as e:
            raise InvalidInput(str(e)) from None
        if config.broker_admin not in BROKER_ADMINS:
            raise InvalidInput(f"controller config: broker_admin must be \"mosquitto\" or empty, "
                               f"not {config.broker_admin!r}")
        if config.broker_admin and config.embedded_broker:
            raise InvalidInput(f"controller config: broker_admin = \"{config.broker_admin}\" needs broker_url "
                               "(the broker it administers); set both or neither")
        return config
