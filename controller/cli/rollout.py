"""``fleetctl rollout list|status|pause|resume|promote|abort|rollback``."""
from __future__ import annotations

import sys
import time
from typing import Any

import click

from ..rollout.spec import percent
from ._output import emit, emitted_as_json, format_option, table
from .client import ApiClient, api_command

LIST_COLUMNS = ["id", "model", "version", "state", "stage", "devices", "succeeded", "failed", "created_at"]
FINISHED = {"SUCCEEDED", "FAILED", "ABORTED", "ROLLED_BACK", "SUPERSEDED"}
BAR_WIDTH = 20


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = round(width * done / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _value(value: float | None, gate: str) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if gate in ("failure_rate", "p99_regression", "error_rate") else f"{value:.3g}"


def render_status(status: dict[str, Any]) -> str:
    """The human view: header, progress per stage and hardware class, gates, failing devices."""
    stages = status["stages"]
    lines = [
        f"rollout {status['id']}  {status['model']}:{status['version']}  {status['state']}  "
        f"stage {status['stage'] + 1}/{len(stages)} ({percent(stages[status['stage']])})",
        f"selector: {status['selector']}",
        f"devices: {status['devices']}  succeeded: {status['succeeded']}  failed: {status['failed']}",
        f"detail: {status['detail'] or '-'}",
        "",
    ]
    rows = []
    for stage in status["progress"]:
        label = f"{stage['stage'] + 1} ({percent(stage['share'])})"
        if not stage["classes"]:
            rows.append({"stage": label, "class": "-", "progress": bar(0, 0), "done": "-", "states": "not started"})
        for cls, p in stage["classes"].items():
            rows.append({"stage": label, "class": cls, "progress": bar(p["done"], p["total"]),
                         "done": f"{p['done']}/{p['total']}", "states": p["states"]})
    lines.append(table(rows, ["stage", "class", "progress", "done", "states"]))
    if status["gates"]:
        gates = [{"stage": g["stage"] + 1, "class": g["hardware_class"] or "all", "gate": g["gate"],
                  "value": _value(g["value"], g["gate"]), "threshold": _value(g["threshold"], g["gate"]),
                  "verdict": g["verdict"]} for g in status["gates"]]
        lines += ["", "gates:", table(gates, ["stage", "class", "gate", "value", "threshold", "verdict"])]
    trouble = [e for e in status["executions"] if e["state"] not in ("SUCCEEDED", "QUEUED") and e["detail"]]
    if trouble:
        lines += ["", "devices:", table(trouble, ["device", "hardware_class", "variant", "state", "detail"])]
    return "\n".join(lines)


@click.group(name="rollout")
def cli() -> None:
    """Follow and steer staged rollouts.

    \b
    Example:
      fleetctl rollout list
      fleetctl rollout status digits-1.1.0-3fa2c1 --watch
      fleetctl rollout pause digits-1.1.0-3fa2c1
    """


@cli.command(name="list")
@click.option("--state", help="Only rollouts in this state, e.g. RUNNING.")
@format_option
@api_command
def list_rollouts(client: ApiClient, state: str | None, fmt: str) -> None:
    """List rollouts, newest first."""
    emit(client.get("/v1/rollouts", state=state), fmt, LIST_COLUMNS)


@cli.command()
@click.argument("rollout_id")
@click.option("-w", "--watch", is_flag=True, help="Redraw until the rollout finishes (Ctrl-C to stop).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.2), help="Seconds between redraws.")
@format_option
@api_command
def status(client: ApiClient, rollout_id: str, watch: bool, interval: float, fmt: str) -> None:
    """Progress per stage and hardware class, gate values, thresholds and verdicts."""
    live = watch and fmt == "table"
    previous = None
    while True:
        data = client.get(f"/v1/rollouts/{rollout_id}")
        if not emitted_as_json(data, fmt):
            text = render_status(data)
            if text != previous:
                if live and sys.stdout.isatty():
                    click.clear()
                click.echo(text)
                previous = text
        if not live or data["state"] in FINISHED:
            return
        time.sleep(interval)


def _control(action: str, help_text: str) -> click.Command:
    @click.argument("rollout_id")
    @format_option
    @api_command
    def command(client: ApiClient, rollout_id: str, fmt: str) -> None:
        data = client.post(f"/v1/rollouts/{rollout_id}/{action}")
        if not emitted_as_json(data, fmt):
            click.echo(f"rollout {rollout_id}: {data['state']} ({data['detail']})")

    command.__doc__ = help_text
    return cli.command(name=action)(command)


_control("pause", "Stop starting new devices; devices already updating finish.")
_control("resume", "Continue a paused rollout.")
_control("promote", "Advance to the next stage now, without waiting for the gates.")
_control("abort", "Stop the rollout; devices not yet updated stay on what they run.")
_control("rollback", "Stop the rollout and roll every device it updated back to its previous version.")
