"""Output formats shared by every noun: human tables by default, ``--format json`` for scripts.

``-o/--output`` is kept for one meaning across fleetctl: the path a command writes to."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Output format.",
)


def emitted_as_json(data: Any, fmt: str) -> bool:
    """Print ``data`` as JSON if ``--format json`` asked for it; True when it did (the caller is done)."""
    if fmt != "json":
        return False
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    return True


def emit(data: Any, fmt: str, columns: Sequence[str] | None = None) -> None:
    """Print ``data`` (a dict or a list of dicts) as JSON or as a table of ``columns``."""
    if emitted_as_json(data, fmt):
        return
    rows = data if isinstance(data, list) else [data]
    if columns is None:
        columns = list(rows[0]) if rows else []
    click.echo(table(rows, columns))


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line([c.upper() for c in columns])] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def emit_record(data: dict, fmt: str, fields: Sequence[str] | None = None) -> None:
    """Print one object: JSON, or one aligned ``field: value`` line per field."""
    if emitted_as_json(data, fmt):
        return
    fields = list(fields if fields is not None else data)
    width = max((len(f) for f in fields), default=0)
    for f in fields:
        click.echo(f"{f + ':':<{width + 1}} {_cell(data.get(f))}")
