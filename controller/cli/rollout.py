"""``fleetctl rollout list|status|pause|resume|promote|abort|rollback``.

``rollout status --watch`` is scriptable: it exits when the rollout finishes, with a code
per final state (EXIT_CODES), or with EXIT_TIMEOUT when ``--timeout`` passes first.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any

import click

from ..rollout.spec import parse_duration, percent
from ._output import emit, emitted_as_json, format_option, table
from .client import ApiClient, api_command

LIST_COLUMNS = ["id", "model", "version", "state", "stage", "devices", "succeeded", "failed", "created_at"]
# `rollout status --watch` exits with these once the rollout is finished (1 stays "error", 2 "usage")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 3, "ABORTED": 4, "ROLLED_BACK": 5, "SUPERSEDED": 6}
EXIT_TIMEOUT = 124  # as timeout(1): --timeout passed before the rollout finished
BAR_WIDTH = 20


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = round(width * done / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _value(value: float | None, gate: str) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if gate in ("failure_rate", "p99_regression", "error_rate") else f"{value:.3g}"


def stage_number(status: dict[str, Any]) -> str:
    """The 1-based stage of a rollout as people count: ``2/3``."""
    return f"{status['stage'] + 1}/{len(status['stages'])}"


def clock(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``7s``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def render_status(status: dict[str, Any]) -> str:
    """The human view: header, progress per stage and hardware class, bake, gates, failing devices."""
    stages = status["stages"]
    lines = [
        f"rollout {status['id']}  {status['model']}:{status['version']}  {status['state']}  "
        f"stage {stage_number(status)} ({percent(stages[status['stage']])})",
        f"selector: {status['selector']}",
        f"devices: {status['devices']}  succeeded: {status['succeeded']}  failed: {status['failed']}",
        f"detail: {status['detail'] or '-'}",
    ]
    bake = status.get("bake")
    if bake is not None:
        ends = datetime.fromisoformat(bake["ends_at"]) if isinstance(bake["ends_at"], str) else bake["ends_at"]
        lines.append(f"bake: {clock(bake['left_s'])} left of {clock(bake['seconds'])} "
                     f"(ends {ends:%H:%M:%S} UTC)" if bake["left_s"] > 0 else
                     f"bake: done ({clock(bake['seconds'])})")
    lines.append("")
    rows = []
    for stage in status["progress"]:
        label = f"{stage['stage'] + 1} ({percent(stage['share'])})"
        if not stage["classes"]:
            ahead = stage["stage"] > status["stage"] and status["state"] != "SUCCEEDED"
            rows.append({"stage": label, "class": "-", "progress": bar(0, 0), "done": "-",
                         "states": "not started" if ahead else "no devices"})
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


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else parse_duration(value, "--timeout")


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
    rollouts = client.get("/v1/rollouts", state=state)
    emit(rollouts if fmt == "json" else [{**r, "stage": stage_number(r)} for r in rollouts], fmt, LIST_COLUMNS)


@cli.command()
@click.argument("rollout_id")
@click.option("-w", "--watch", is_flag=True,
              help="Redraw until the rollout finishes, then exit with its final state's code.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.2), help="Seconds between redraws.")
@click.option("--timeout", callback=_duration, metavar="DURATION",
              help=f"With --watch: give up after this long (e.g. 30m) with exit code {EXIT_TIMEOUT}.")
@format_option
@api_command
def status(client: ApiClient, rollout_id: str, watch: bool, interval: float, timeout: float | None,
           fmt: str) -> None:
    """Progress per stage and hardware class, bake time left, gate values, thresholds and verdicts.

    \b
    With --watch (--format json prints one object per change) the exit code tells how it ended:
      0 SUCCEEDED   3 FAILED   4 ABORTED   5 ROLLED_BACK   6 SUPERSEDED
      124 --timeout passed first   1 error (e.g. unknown rollout, controller unreachable)
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    previous = None
    while True:
        data = client.get(f"/v1/rollouts/{rollout_id}")
        text = None if fmt == "json" else render_status(data)
        shown = text if text is not None else {k: v for k, v in data.items() if k != "bake"}
        if shown != previous:  # a watcher sees each change once (json: not the bake countdown)
            if text is None:
                emitted_as_json(data, fmt)
            else:
                if watch and sys.stdout.isatty():
                    click.clear()
                click.echo(text)
            previous = shown
        if not watch:
            return
        if data["state"] in EXIT_CODES:
            sys.exit(EXIT_CODES[data["state"]])
        if deadline is not None and time.monotonic() >= deadline:
            click.echo(f"error: rollout {rollout_id} is still {data['state']} at stage {stage_number(data)} "
                       f"after --timeout {clock(timeout or 0)}", err=True)
            sys.exit(EXIT_TIMEOUT)
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))


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
