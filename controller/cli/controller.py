"""``fleetctl controller run``: the controller service in the foreground."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from edgefleet.common import logs
from edgefleet.common.defaults import fleet_home
from edgefleet.common.settings import environment_help

from ..config import ENV_PREFIX, ControllerConfig
from ..errors import InvalidInput

# Libraries that log every packet, job run or migration step at INFO.
QUIET_LOGGERS = ("amqtt", "transitions", "apscheduler", "alembic")


@click.group(name="controller")
def cli() -> None:
    """Run the controller service."""


@cli.command(epilog="\b\n" + environment_help(ControllerConfig, ENV_PREFIX, "config.toml"))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="config.toml to use (default: HOME/config.toml; HOME is $EDGEFLEET_HOME or ~/.edgefleet).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(logs.LEVELS),
              envvar="EDGEFLEET_LOG_LEVEL", show_envvar=True, help="The API server (uvicorn) follows it too.")
@click.option("--log-format", default="auto", show_default=True, type=click.Choice(logs.FORMATS),
              envvar="EDGEFLEET_LOG_FORMAT", show_envvar=True,
              help="auto: journal (<6> priority prefixes) when stderr is journald's, else text.")
def run(config_path: Path | None, log_level: str, log_format: str) -> None:
    """Serve the API and repository, bridge MQTT and run the scheduled jobs until SIGTERM.

    With no configuration: SQLite in HOME, the local store in HOME/store and an
    embedded MQTT broker on 127.0.0.1:1884.

    \b
    Example:
      fleetctl init && fleetctl controller run
      fleetctl controller run --config /etc/edgefleet/config.toml
    """
    logs.setup(log_level, log_format)
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    if config_path is not None and not config_path.is_file():
        raise InvalidInput(f"config file {config_path} does not exist")
    config = ControllerConfig.load(fleet_home(), config_path)
    from ..service import (
        ControllerService,  # the web stack loads only for this command: fleetctl starts fast
    )

    ControllerService(config).run()
