"""``fleetctl broker config``: write a production broker's configuration for this fleet."""
from __future__ import annotations

from pathlib import Path

import click
import sqlalchemy as sa

from edgefleet.common.defaults import fleet_home
from edgefleet.common.settings import toml_value

from ..config import ControllerConfig
from ..db.models import Device
from ..db.session import Database
from ..mosquitto_config import MosquittoOptions, write_mosquitto


@click.group(name="broker")
def cli() -> None:
    """Configure a production MQTT broker for the fleet."""


@cli.group(name="config")
def config_group() -> None:
    """Write a broker's configuration files."""


@config_group.command(name="mosquitto")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for mosquitto.conf, certificates and the dynamic-security file.")
@click.option("--host", "hosts", multiple=True, default=("localhost",), show_default=True,
              help="Name or IP address devices and the controller reach the broker by (repeatable).")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535))
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address the listener binds.")  # noqa: S104
@click.option("--plugin", default="", help="Path of mosquitto_dynamic_security.so (default: found).")
@click.option("--user", default="", help="Account Mosquitto runs as when started as root (default: mosquitto); "
              "it must own DIR.")
@click.option("--days", default=365, show_default=True, type=click.IntRange(min=1),
              help="Lifetime of the broker's and the controller's certificates.")
@click.option("--replica", "replicas", multiple=True, metavar="NAME",
              help="A further controller replica on this broker, with an identity of its own (repeatable).")
def mosquitto(output: Path, hosts: tuple[str, ...], port: int, bind: str, plugin: str, user: str, days: int,
              replicas: tuple[str, ...]) -> None:
    """Mosquitto 2: TLS with client certificates from the fleet CA, per-device ACLs.

    A device may publish only its own reported/events/telemetry/status and read
    only its own desired; the controller's identity (its certificate goes to
    HOME/mqtt) owns the rest and the fleet's share group. Devices already
    enrolled are admitted; `fleetctl devices remove` revokes one at once.
    Each --replica NAME gets its own certificate in HOME/mqtt/NAME, since
    the broker names a session after its certificate.

    \b
    Example:
      fleetctl broker config mosquitto -o /etc/mosquitto/edgefleet --host broker.lan
      chown -R mosquitto /etc/mosquitto/edgefleet
      mosquitto -c /etc/mosquitto/edgefleet/mosquitto.conf
    """
    config = ControllerConfig.load(fleet_home())
    options = MosquittoOptions(output=output, hosts=hosts, port=port, bind=bind, plugin=plugin, user=user,
                               lifetime_s=days * 86400, devices=_enrolled(config), replicas=replicas)
    written = write_mosquitto(config, options)
    click.echo(f"wrote {written.config_file} ({len(options.devices)} enrolled device(s) admitted)")
    click.echo(f"start:  mosquitto -c {written.config_file}")
    click.echo(f"then set in {config.home / 'config.toml'} (top level) and restart the controller:")
    for key, value in written.controller_settings.items():
        click.echo(f"  {key} = {toml_value(value)}")
    for name, settings in written.replica_settings.items():
        click.echo(f"replica {name}: the same, but run it with")
        for key, value in settings.items():
            click.echo(f"  EDGEFLEET_{key.upper()}={value}")


def _enrolled(config: ControllerConfig) -> list[str]:
    db = Database(config.effective_database_url)
    try:
        db.check_schema()
        with db.reading() as session:
            return list(session.scalars(sa.select(Device.id).where(Device.token_hash.is_not(None)).order_by(Device.id)))
    finally:
        db.dispose()
