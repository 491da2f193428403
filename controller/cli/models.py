"""``fleetctl models``: published models, their versions and variants (through the API)."""
from __future__ import annotations

from pathlib import Path

import click

from ..rollout.spec import parse_fraction
from ._output import emit, emitted_as_json, format_option, table
from .client import ApiClient, api_command
from .deploy import parse_target

LIST_COLUMNS = ["model", "latest", "versions", "variants", "published_at"]
SHOW_COLUMNS = ["version", "release", "variant", "size_bytes", "p99_ms", "top1", "target_path"]
FRONTIER_COLUMNS = ["class", "variant", "metric", "accuracy", "p50_ms", "p99_ms", "devices", "frontier", "pick", "note"]


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


@cli.command()
@click.argument("target", metavar="NAME:VERSION")
@click.option("--min-accuracy",
              help="Accuracy floor (e.g. 95% or 0.95): the pick is the fastest variant at or above it.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the frontier into FILE (needs Pillow).")
@format_option
@api_command
def frontier(client: ApiClient, target: str, min_accuracy: str | None, png: Path | None, fmt: str) -> None:
    """Latency (devices' benchmarks, per hardware class) against accuracy (the build) of each variant.

    A variant on the frontier is beaten by no other measured on the class in both
    accuracy and p99; the pick is what the planner chooses for the class.

    \b
    Example:
      fleetctl models frontier textdir:1.0.0 --min-accuracy 99% --png frontier.png
    """
    name, version = parse_target(target)
    floor = None if min_accuracy is None else parse_fraction(min_accuracy, "--min-accuracy")
    found = client.get(f"/v1/models/{name}/{version}/frontier", min_accuracy=floor)
    if png is not None:
        from .frontier_png import draw

        draw(found, png)
    if emitted_as_json(found, fmt):
        return
    rows = [
        {**p, "class": cls, "frontier": "*" if p["on_frontier"] else "", "pick": "<- pick" if p["picked"] else ""}
        for cls, points in sorted(found["classes"].items()) for p in points
    ]
    floor = found["min_accuracy"]
    click.echo(f"{name}:{version}: accuracy from the build, latency from devices' on-device benchmarks"
               + (f"; floor {floor:.4g}" if floor is not None else ""))
    click.echo(table(rows, FRONTIER_COLUMNS))
    if png is not None:
        click.echo(f"drew {png}")
