"""``fleetctl data export|stats``: sampled production data back for retraining."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import click

from ..dataset import SampleRecord, export
from ._output import emitted_as_json, format_option, table
from .client import ApiClient, api_command

PAGE = 500


def sample_records(client: ApiClient, model: str | None, version: str | None,
                   since: datetime | None) -> Iterator[SampleRecord]:
    """The samples index, page by page (keyset on id)."""
    after = 0
    while True:
        page = client.get("/v1/data/samples", model=model, version=version,
                          since=since.isoformat() if since else None, after=after, limit=PAGE)
        for row in page:
            yield SampleRecord.from_dict({**row, "ts": str(row["ts"])})
        if len(page) < PAGE:
            return
        after = page[-1]["id"]


@click.group(name="data")
def cli() -> None:
    """Export sampled production data as a training set, and summarize it.

    \b
    Example:
      fleetctl data export --model digits --version 1.1.0 --low-confidence -o dataset/
      fleetctl data stats --model digits
    """


@cli.command(name="export")
@click.option("--model", required=True, help="Model name.")
@click.option("--version", help="Only this version.")
@click.option("--since", type=click.DateTime(), help="Only samples uploaded at or after (UTC), e.g. 2026-01-31.")
@click.option("--low-confidence", is_flag=True, help="Only rows kept for low confidence or a low margin.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: shard-NNNNN.npz + index.jsonl.")
@api_command
def export_data(client: ApiClient, model: str, version: str | None, since: datetime | None,
                low_confidence: bool, out: Path) -> None:
    """Write .npz shards of the sampled tensors plus an index.jsonl of their metadata."""
    client.get(f"/v1/models/{model}")  # an unknown model is an error (a typo), not an empty dataset
    records = sample_records(client, model, version, since)
    result = export(records, lambda r: client.get_bytes(f"/v1/data/samples/{r.id}"), out, low_confidence)
    click.echo(f"wrote {result.rows} row(s) from {result.samples} sample shard(s) into "
               f"{len(result.shards)} shard(s) and index.jsonl in {out}")
    for line in result.skipped:
        click.echo(f"skipped {line}", err=True)


@cli.command()
@click.option("--model", help="Only this model.")
@click.option("--version", help="Only this version.")
@click.option("--since", type=click.DateTime(), help="Only samples uploaded at or after (UTC).")
@format_option
@api_command
def stats(client: ApiClient, model: str | None, version: str | None, since: datetime | None, fmt: str) -> None:
    """Samples, top-1 confidence distribution and predicted-class histogram by hardware class."""
    data = client.get("/v1/data/stats", model=model, version=version, since=since.isoformat() if since else None)
    if emitted_as_json(data, fmt):
        return
    rows = [{
        **g,
        "confidence": " ".join(str(n) for n in g["confidence_histogram"]),
        "top_classes": ", ".join(
            f"{c}:{n}" for c, n in sorted(g["class_histogram"].items(), key=lambda kv: -kv[1])[:5]
        ),
    } for g in data["groups"]]
    click.echo(table(rows, ["model", "version", "hardware_class", "samples", "low_confidence", "confidence",
                            "top_classes"]))
    click.echo(f"confidence bins: {' '.join(f'{b:g}' for b in data['groups'][0]['confidence_bins'])}"
               if data["groups"] else "no samples")
    click.echo(f"read {data['shards_read']} of {data['shards_total']} shard(s); unreadable: {data['unreadable']}")
