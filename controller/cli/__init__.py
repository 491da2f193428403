"""``fleetctl``: the operator CLI, a thin layer over the library and the API.

Every module in this package that defines ``cli`` (a click command or group)
is one noun: ``fleetctl bundle ...``, ``fleetctl devices ...``.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from ..errors import ControllerError


class _Fleetctl(click.Group):
    """Translates the controller's errors into one line and exit code 1."""

    def invoke(self, ctx: click.Context):
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
    """


def _register() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        command = getattr(module, "cli", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_register()
