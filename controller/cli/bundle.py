"""``fleetctl bundle``: build hardware-specialized variants, check them, publish them signed."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ..accuracy import METRICS
from ..errors import BuildError
from ._output import emit, format_option, table

BUILD_COLUMNS = ("variant", "size_bytes", "ops", "p50_ms", "p99_ms")
ACCURACY_COLUMNS = ("agreement", "max_abs_diff")
ACCURACY_METRICS = (*METRICS, "cer")  # a pipeline's table shows each member's task metrics

_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


# OUT: the directory `fleetctl bundle build -o OUT` wrote
built_bundle = click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))


@click.group(name="bundle")
def cli() -> None:
    """Model bundles: one file per hardware variant, a report and golden sets."""


@cli.command()
@click.argument("model", type=_existing_file)
@click.option("--name", required=True, help="Model name, e.g. digits.")
@click.option("--version", "version", required=True, help="Model version, e.g. 1.0.0.")
@click.option("--variant", "variants", multiple=True,
              type=click.Choice(["cpu-fp32", "cpu-int8", "cuda-fp16"]),
              help="Variant to build (repeatable). Default: every variant that fits the model.")
@click.option("--calibration", type=_existing_file, help="DATA.npz for static int8 calibration.")
@click.option("--eval", "eval_data", type=_existing_file,
              help="DATA.npz with the truth for accuracy: 'labels' (classes), 'texts' (CTC) or 'boxes' (text boxes).")
@click.option("--max-drop", "--max-top1-drop", "max_drop", default=1.0, show_default=True,
              type=click.FloatRange(0, 100),
              help="Refuse a variant losing more than this many points of its task metric "
                   "(top-1, exact match or box F1).")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory to write.")
@format_option
def build(model: Path, name: str, version: str, variants: tuple[str, ...], calibration: Path | None,
          eval_data: Path | None, max_drop: float, out: Path, fmt: str) -> None:
    """Build variants of MODEL.onnx into OUT with a report and golden sets.

    \b
    Example:
      fleetctl bundle build digits.onnx --name digits --version 1.0.0 \\
          --calibration calib.npz --eval eval.npz -o out/
    """
    from ..bundle.build import build_bundle

    report = build_bundle(model, name, version, list(variants) or None, calibration, eval_data, out,
                          max_drop / 100)
    if fmt == "json":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(render_report(report))
    if not report["variants"]:
        raise BuildError(f"no variant of {model} was built; see the refusals above")


def _members(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, Path]:
    members: dict[str, Path] = {}
    for value in values:
        member, sep, directory = value.partition("=")
        if not sep or not member or not directory:
            raise click.BadParameter(f"{value!r} is not NAME=BUNDLE_DIR, e.g. det=out-det/")
        if member in members:
            raise click.BadParameter(f"member {member!r} is given twice")
        members[member] = Path(directory)
    return members


@cli.command()
@click.option("--name", required=True, help="Pipeline name, e.g. ocr.")
@click.option("--version", "version", required=True, help="Pipeline version, e.g. 1.0.0.")
@click.option("--member", "members", multiple=True, required=True, callback=_members, metavar="NAME=BUNDLE_DIR",
              help="A built member bundle (repeatable, in pipeline order), e.g. det=out-det/.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Pipeline bundle directory to write.")
@format_option
def pipeline(name: str, version: str, members: dict[str, Path], out: Path, fmt: str) -> None:
    """Merge built bundles into one pipeline bundle that moves as one unit.

    For each variant every member has, the members' models become one graph (names
    prefixed MEMBER/) with one golden set: devices verify, gate, activate and roll
    it back as one. Publish it with `fleetctl bundle publish OUT`.

    \b
    Example:
      fleetctl bundle pipeline --name ocr --version 1.0.0 \\
          --member det=out-det/ --member cls=out-cls/ --member rec=out-rec/ -o out-ocr/
    """
    from ..bundle.pipeline import build_pipeline

    report = build_pipeline(name, version, members, out)
    if fmt == "json":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        rows = [{**_row(v["variant"], v, {}, BUILD_COLUMNS),
                 "members": ", ".join(f"{k}={value:.4g}" for k, value in sorted(v["accuracy"].items())
                                      if k.split(".", 1)[1] in ACCURACY_METRICS)}
                for v in report["variants"]]
        click.echo(table(rows, (*BUILD_COLUMNS, "members")))
        for refused in report["refused"]:
            click.echo(f"refused: {refused['variant']}: {refused['reason']}")
    if not report["variants"]:
        raise BuildError(f"no variant of pipeline {name} was built; see the refusals above")


def render_report(report: dict) -> str:
    ref = report["reference"]
    metric = ref.get("metric")
    measured = (metric, f"{metric}_drop", *(["cer"] if metric == "exact_match" else [])) if metric else ()
    columns = (*BUILD_COLUMNS, *measured, *ACCURACY_COLUMNS)
    rows = [_row("(source)", ref, ref, columns)]
    rows += [_row(v["variant"], v, v["accuracy"], columns) for v in report["variants"]]
    lines = [table(rows, columns)]
    if ref["eval"] == "synthetic":
        lines.append("note: no --eval set: agreement is on seeded noise and no task metric was checked")
    lines += [f"note: {v['variant']}: {v['note']}" for v in report["variants"] if v.get("note")]
    lines += [f"refused: {r['variant']}: {r['reason']}" for r in report["refused"]]
    return "\n".join(lines)


def _row(label: str, entry: dict, accuracy: dict, columns: tuple[str, ...]) -> dict:
    latency = entry.get("latency_ms") or {}
    return {
        "variant": label, "size_bytes": entry["size_bytes"], "ops": entry["op_count"],
        "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"),
        **{k: accuracy.get(k) for k in columns[len(BUILD_COLUMNS):]},
    }


@cli.command()
@built_bundle
@format_option
def verify(out: Path, fmt: str) -> None:
    """Check that every variant in OUT loads and passes its golden set on this machine.

    \b
    Example:
      fleetctl bundle verify out/
    """
    from ..bundle.verify import verify_bundle

    checks = verify_bundle(out)
    emit([asdict(c) for c in checks], fmt, ["variant", "passed", "max_abs_diff", "detail"])
    failed = [c.variant for c in checks if not c.passed]
    if failed:
        raise BuildError(f"golden check failed for {', '.join(failed)} in {out}")


@cli.command()
@built_bundle
@format_option
def publish(out: Path, fmt: str) -> None:
    """Sign every variant of the bundle in OUT into the fleet's TUF repository.

    \b
    Example:
      fleetctl bundle publish out/
    """
    from ..config import ControllerConfig
    from ..errors import ControllerError
    from ..signing import Repository
    from .client import connect

    infos = Repository.from_config(ControllerConfig.load()).publish(out)
    emit([i.to_dict() for i in infos], fmt, ["model", "version", "variant", "release", "preference", "p99_ms"])
    try:
        client = connect(None, None)
        try:
            client.post("/v1/models/sync")
        finally:
            client.close()
    except ControllerError as e:
        click.echo(f"note: signed, but the controller was not told ({e}); it lists them when it next starts", err=True)
