"""``fleetctl``: the operator CLI, a thin layer over the library and the API.

Each noun is one module whose ``cli`` (a click command or group) is listed in
COMMANDS below: ``fleetctl bundle ...``, ``fleetctl devices ...``.
"""
from __future__ import annotations

import sys

import click

from ..errors import ControllerError
from . import (
    apply,
    audit,
    broker,
    bundle,
    controller,
    data,
    db,
    deploy,
    devices,
    init,
    keys,
    models,
    rollout,
    tokens,
)


class _Fleetctl(click.Group):
    """Translates the controller's errors into one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ControllerError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Fleetctl, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefleet")
def main() -> None:
    """Roll ML models out to fleets of edge devices.

    \b
    Example:
      fleetctl init
      fleetctl bundle build digits.onnx --name digits --version 1.0.0 -o out/
      fleetctl bundle publish out/

    \b
    Environment:
      EDGEFLEET_HOME        fleet home (default: ~/.edgefleet)
      EDGEFLEET_CONTROLLER  controller URL for API commands (--controller)
      EDGEFLEET_TOKEN       operator token for API commands (--token)
      EDGEFLEET_<KEY>       any config.toml key (see `fleetctl controller run --help`)
    Shell completion (bash; zsh and fish alike):
      eval "$(_FLEETCTL_COMPLETE=bash_source fleetctl)"
    """


# Every command group of fleetctl, one per noun.
COMMANDS: tuple[click.Command, ...] = (
    init.cli, keys.cli, controller.cli, db.cli, bundle.cli, models.cli, devices.cli,
    deploy.cli, apply.cli, rollout.cli, data.cli, audit.cli, tokens.cli, broker.cli,
)
for command in COMMANDS:
    main.add_command(command)
