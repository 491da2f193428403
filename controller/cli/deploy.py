"""``fleetctl deploy NAME:VERSION --to SELECTOR``: start a staged rollout (or --dry-run it)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from edgefleet.common.protocol import SamplingPolicy

from ..errors import InvalidInput
from ..rollout.spec import (
    RolloutSpec,
    parse_cron,
    parse_duration,
    parse_fraction,
    parse_stages,
    percent,
)
from ._output import emitted_as_json, format_option, table
from .client import ApiClient, api_command


def _converter(
    parse: Callable[[str, str], Any], what: str
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def convert(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        return None if value is None else parse(value, what)
    return convert


def _stages(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[float, ...]:
    return parse_stages(value)


def submit(client: ApiClient, manifest: dict[str, Any], dry_run: bool, fmt: str) -> None:
    """Send a manifest to the API and print the rollout or its plan."""
    answer = client.post("/v1/rollouts", {"manifest": manifest, "dry_run": dry_run})
    if emitted_as_json(answer, fmt):
        return
    click.echo(render_plan(answer["plan"]))
    if answer["created"]:
        click.echo(f"rollout {answer['id']} created; follow it with `fleetctl rollout status {answer['id']} --watch`")
        for old in answer["superseded"]:
            click.echo(f"superseded rollout {old}")
    else:
        click.echo("dry run: nothing was changed")


def render_plan(plan: dict[str, Any]) -> str:
    """Devices per stage, the variant each gets and why; devices no variant fits."""
    rows = [
        {"stage": f"{s['stage'] + 1} ({percent(s['share'])})", "device": d["device"],
         "class": d["hardware_class"], "variant": d["variant"], "why": d["reason"]}
        for s in plan["stages"] for d in s["devices"]
    ]
    lines = [f"plan of rollout {plan['rollout']}: {len(rows)} device(s) in {len(plan['stages'])} stage(s)"]
    lines.append(table(rows, ["stage", "device", "class", "variant", "why"]))
    if plan["unfit"]:
        lines.append(f"{len(plan['unfit'])} selected device(s) no variant fits:")
        lines.append(table(plan["unfit"], ["device", "hardware_class", "reason"]))
    return "\n".join(lines)


def parse_target(text: str) -> tuple[str, str]:
    name, sep, version = text.partition(":")
    if not sep or not name or not version:
        raise InvalidInput(f"{text!r} is not NAME:VERSION, e.g. digits:1.1.0")
    return name, version


@click.command(name="deploy")
@click.argument("target", metavar="NAME:VERSION")
@click.option("--to", "selector", required=True, help="Label selector, e.g. 'site=berlin,hw.class in (x86_64,rpi-4)'.")
@click.option("--stages", default="5%,25%,100%", show_default=True, callback=_stages,
              help="Cumulative share of the selected devices per stage.")
@click.option("--bake", default="10m", show_default=True, callback=_converter(parse_duration, "--bake"),
              help="Observe each stage this long after its devices finish.")
@click.option("--max-failure-rate", default="2%", show_default=True,
              callback=_converter(parse_fraction, "--max-failure-rate"))
@click.option("--max-p99-regression", default="15%", show_default=True,
              callback=_converter(parse_fraction, "--max-p99-regression"),
              help="On-device p99 vs the previous version on the same hardware class.")
@click.option("--max-error-rate", default="1%", show_default=True,
              callback=_converter(parse_fraction, "--max-error-rate"))
@click.option("--max-confidence-shift", default="0.2", show_default=True,
              callback=_converter(parse_fraction, "--max-confidence-shift"),
              help="Change of the mean top-1 confidence vs the previous version.")
@click.option("--min-accuracy", callback=_converter(parse_fraction, "--min-accuracy"),
              help="Accuracy floor, e.g. 95%: per hardware class, the fastest variant whose task metric "
                   "(from the build) is at least this (see `fleetctl models frontier`).")
@click.option("--min-samples", default=0, show_default=True, type=click.IntRange(0),
              help="Require data: a gate passes only on a value over this many samples (devices, benchmarks, "
                   "requests, sampled rows); short of them the stage waits, and fails at its deadline "
                   "(bake + device timeout after its devices finished).")
@click.option("--min-devices-per-stage", default=1, show_default=True, type=click.IntRange(0),
              help="Of every hardware class, where possible.")
@click.option("--window", "window_cron", metavar="CRON", callback=_converter(parse_cron, "--window"),
              help='Maintenance window (device local time), e.g. "0 2 * * *" or "30 1 * * MON-FRI".')
@click.option("--window-duration", callback=_converter(parse_duration, "--window-duration"), help="e.g. 2h")
@click.option("--device-timeout", default="30m", show_default=True,
              callback=_converter(parse_duration, "--device-timeout"))
@click.option("--max-retries", default=2, show_default=True, type=click.IntRange(0, 20))
@click.option("--sample-rate", default=None, callback=_converter(parse_fraction, "--sample-rate"),
              help="Keep this share of production requests for retraining, e.g. 1%.")
@click.option("--sample-low-confidence", type=click.FloatRange(0, 1), help="Keep requests whose top-1 is below this.")
@click.option("--allow-downgrade", is_flag=True, help="Allow a version older than the one running.")
@click.option("--supersede", is_flag=True, help="Replace active rollouts on the same devices.")
@click.option("--name", help="Rollout id (default: generated).")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@format_option
@api_command
def cli(client: ApiClient, target: str, selector: str, stages: tuple[float, ...], bake: float,
        max_failure_rate: float, max_p99_regression: float, max_error_rate: float, max_confidence_shift: float,
        min_accuracy: float | None, min_samples: int, min_devices_per_stage: int, window_cron: str | None,
        window_duration: float | None, device_timeout: float, max_retries: int, sample_rate: float | None,
        sample_low_confidence: float | None, allow_downgrade: bool, supersede: bool, name: str | None,
        dry_run: bool, fmt: str) -> None:
    """Roll NAME:VERSION out to the devices SELECTOR matches, stage by stage.

    \b
    Example:
      fleetctl deploy digits:1.1.0 --to site=berlin --stages 5%,25%,100% --bake 10m --dry-run
      fleetctl deploy digits:1.1.0 --to "hw.class in (x86_64,rpi-4)" --window "0 2 * * *" --window-duration 2h
    """
    model, version = parse_target(target)
    sampling = SamplingPolicy()
    if sample_rate is not None or sample_low_confidence is not None:
        sampling = SamplingPolicy(enabled=True, rate=sample_rate or 0.0, low_confidence_below=sample_low_confidence)
    spec = RolloutSpec(
        model=model, version=version, selector=selector, stages=stages, bake_s=bake,
        max_failure_rate=max_failure_rate, max_p99_regression=max_p99_regression, max_error_rate=max_error_rate,
        max_confidence_shift=max_confidence_shift, min_accuracy=min_accuracy, min_samples=min_samples,
        min_devices_per_stage=min_devices_per_stage,
        window_cron=window_cron, window_duration_s=window_duration, allow_downgrade=allow_downgrade,
        supersede=supersede, device_timeout_s=device_timeout, max_retries=max_retries, sampling=sampling,
    )
    submit(client, spec.to_manifest(name), dry_run, fmt)
