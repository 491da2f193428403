"""``fleetctl models``: published models, their versions and variants (through the API)."""
from __future__ import annotations

import click

from ._output import emit, emitted_as_json, format_option
from .client import ApiClient, api_command

LIST_COLUMNS = ["model", "latest", "versions", "variants", "published_at"]
SHOW_COLUMNS = ["version", "release", "variant", "size_bytes", "p99_ms", "top1", "target_path"]


@click.group(name="models")
def cli() -> None:
    """Inspect published models.

    \b
    Example:
      fleetctl models list
      fleetctl models show digits --format json
    """


@cli.command(name="list")
@format_option
@api_command
def list_models(client: ApiClient, fmt: str) -> None:
    """List published models, newest version first."""
    emit(client.get("/v1/models"), fmt, LIST_COLUMNS)


@cli.command()
@click.argument("name")
@format_option
@api_command
def show(client: ApiClient, name: str, fmt: str) -> None:
    """Show every version and variant of model NAME."""
    model = client.get(f"/v1/models/{name}")
    if emitted_as_json(model, fmt):
        return
    rows = [
        {**variant, "version": version["version"], "release": version["release"],
         "top1": variant["accuracy"].get("top1")}
        for version in model["versions"]
        for variant in version["variants"]
    ]
    emit(rows, fmt, SHOW_COLUMNS)
