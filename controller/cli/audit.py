"""``fleetctl audit``: who changed what, when (through the API)."""
from __future__ import annotations

import click

from ._output import emit, format_option
from .client import ApiClient, api_command

COLUMNS = ["ts", "actor", "action", "target", "detail"]


@click.command(name="audit")
@click.option("-n", "--limit", default=50, show_default=True, type=click.IntRange(1, 10_000),
              help="Newest entries to show.")
@click.option("--action", help="Only this action, e.g. device.label.")
@click.option("--target", help="Only entries about this target, e.g. a device id.")
@format_option
@api_command
def cli(client: ApiClient, limit: int, action: str | None, target: str | None, fmt: str) -> None:
    """Show the audit log, newest first.

    \b
    Example:
      fleetctl audit --action device.remove
      fleetctl audit --target pi-042 --format json
    """
    emit(client.get("/v1/audit", limit=limit, action=action, target=target), fmt, COLUMNS)
