"""``fleetctl broker config mosquitto``: a Mosquitto 2 configuration for the fleet.

One TLS listener that requires a client certificate from the fleet CA and takes its
subject CN as username and client id (no one can take another's client id); the
dynamic-security plugin holds the controller's identities and each enrolled device
(see ``dynsec``). The controller's own client certificates go to the fleet home, never
to the broker's directory: HOME/mqtt for the first controller, HOME/mqtt/NAME for each
further replica, whose identity (and so client id) is ``edgefleet:controller:NAME``.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.common.errors import StorageError
from edgefleet.common.fs import atomic_write

from . import dynsec
from .config import ControllerConfig
from .errors import InvalidInput, Unavailable
from .pki import CA_CERT_FILE, CONTROLLER_IDENTITY, FleetCA, ca_dir, replica_identity

PLUGIN_GLOBS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                "/usr/local/lib/mosquitto_dynamic_security.so", "/usr/local/lib/*/mosquitto_dynamic_security.so")
CONTROLLER_DIR = "mqtt"


@dataclass(frozen=True)
class MosquittoOptions:
    output: Path
    hosts: tuple[str, ...] = ("localhost",)  # names (DNS or IP) devices use to reach the broker
    port: int = 8883
    bind: str = "0.0.0.0"                    # noqa: S104 - a broker listens for the fleet
    plugin: str = ""                         # dynamic-security plugin; empty: found in the usual places
    user: str = ""                           # account a broker started as root runs as (empty: "mosquitto")
    lifetime_s: int = 365 * 86400            # of the server and controller certificates
    devices: list[str] = field(default_factory=list)  # enrolled devices to admit from the start
    replicas: tuple[str, ...] = ()           # further controller replicas, each with an identity of its own


@dataclass(frozen=True)
class Written:
    config_file: Path
    controller_settings: dict[str, str]  # the keys config.toml needs to use this broker
    replica_settings: dict[str, dict[str, str]]  # per further replica: the keys that differ from the first


def find_plugin() -> str:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise InvalidInput("Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was not found: "
                       "install mosquitto 2 or pass --plugin PATH")


def mosquitto_conf(options: MosquittoOptions, plugin: str) -> str:
    out = options.output.resolve()
    return "\n".join([
        "# Written by `fleetctl broker config mosquitto`; start with:",
        f"#   mosquitto -c {out / 'mosquitto.conf'}",
        *([f"user {options.user}"] if options.user else []),
        "per_listener_settings false",
        "allow_anonymous false",
        "# Small TLS records must not wait for a delayed ACK: a CONNACK took 45 ms instead of 3.",
        "set_tcp_nodelay true",
        "persistence true",
        f"persistence_location {out}/",
        "# The controller receives every device's QoS 1 messages: no queue cap, or past it they are dropped.",
        "max_queued_messages 0",
        f"plugin {plugin}",
        f"plugin_opt_config_file {out / 'dynamic-security.json'}",
        "",
        f"listener {options.port} {options.bind}",
        f"cafile {out / 'ca.pem'}",
        f"certfile {out / 'server.pem'}",
        f"keyfile {out / 'server-key.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "",
    ])


def write_mosquitto(config: ControllerConfig, options: MosquittoOptions) -> Written:
    """Write the broker's files to ``options.output`` and the controller's identity to HOME/mqtt."""
    if not options.hosts:
        raise InvalidInput("give at least one --host: the name devices use to reach the broker")
    plugin = options.plugin or find_plugin()
    identities = {CONTROLLER_IDENTITY: config.home / CONTROLLER_DIR}
    for name in options.replicas:
        identities[replica_identity(name)] = config.home / CONTROLLER_DIR / name
    if len(identities) != 1 + len(options.replicas):
        raise InvalidInput("each --replica needs a name of its own")
    ca = FleetCA.load(config.home)
    server_key, server = ca.issue_with_key(options.hosts[0], options.lifetime_s, server_names=options.hosts)
    out = options.output
    files = {
        out / "ca.pem": ca.certificate_pem.encode(),
        out / "server.pem": server.pem.encode(),
        out / "server-key.pem": server_key,
        out / "dynamic-security.json": json.dumps(
            dynsec.initial_config(list(identities), config.effective_share_group, options.devices), indent=1
        ).encode(),
        out / "mosquitto.conf": mosquitto_conf(options, plugin).encode(),
    }
    for identity, folder in identities.items():
        key, certificate = ca.issue_with_key(identity, options.lifetime_s)
        files[folder / "controller.pem"] = certificate.pem.encode()
        files[folder / "controller-key.pem"] = key
    try:
        out.mkdir(parents=True, exist_ok=True)
        for folder in identities.values():
            folder.mkdir(mode=0o700, exist_ok=True)
        for path, data in files.items():
            atomic_write(path, data)
    except (OSError, StorageError) as e:
        raise Unavailable(f"cannot write the Mosquitto configuration: {e}") from e
    mine = config.home / CONTROLLER_DIR
    return Written(out / "mosquitto.conf", {
        "broker_url": f"mqtts://{options.hosts[0]}:{options.port}",
        "mqtt_ca_file": str(ca_dir(config.home) / CA_CERT_FILE),
        **_identity_settings(mine),
        "broker_admin": "mosquitto",
    }, {name: _identity_settings(mine / name) for name in options.replicas})


def _identity_settings(folder: Path) -> dict[str, str]:
    return {"mqtt_cert_file": str(folder / "controller.pem"), "mqtt_key_file": str(folder / "controller-key.pem")}
