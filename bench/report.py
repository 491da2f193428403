"""bench/RESULTS.md from the captured output of each benchmark run.

Nothing here knows a figure: the headline ratios are read back out of the
markdown tables the benchmark scripts printed, by column name.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.machine import Machine

Row = dict[str, str]


@dataclass(frozen=True)
class Run:
    """One benchmark subprocess, as captured (and saved as JSON beside RESULTS.md's inputs)."""

    key: str
    command: list[str]
    returncode: int
    stdout: str
    stderr_tail: str
    started: str                          # UTC, ISO 8601
    seconds: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    size: str                             # "full" or "small"
    code: str = ""                        # the commit measured (bench.run_all.code_version)
    load_peak: float | None = None        # highest 1-minute load average sampled during the run

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def load(cls, path: Path) -> Run:
        data = json.loads(path.read_text())
        data["load_before"], data["load_after"] = tuple(data["load_before"]), tuple(data["load_after"])
        return cls(**data)


def tables(text: str) -> list[list[Row]]:
    """Every markdown table in ``text``, as rows keyed by the header cells."""
    found: list[list[Row]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            header = block[0]
            found.append([dict(zip(header, cells, strict=False)) for cells in block[2:]])
        block = []
    return found


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x").strip("*"))


def _fanout(rows: list[Row]) -> list[str]:
    return [f"Fan-out to {int(_number(r['devices'])):,} "
            f"{'thin ' if r.get('device kind', '').startswith('thin') else ''}devices: "
            f"deploy → all SUCCEEDED in {r['deploy→all SUCCEEDED s']} s "
            f"= **{r['devices/min']} devices/min**, {r['vs AWS IoT Jobs (1,000/min)']}x AWS IoT Jobs' 1,000/min "
            f"({r['deploy / bare broker']}x a bare broker fan-out)"
            + (f"; controller {r['controller CPU-ms/device']} CPU-ms/device, broker {r['broker CPU-ms/device']}"
               if "controller CPU-ms/device" in r else "") for r in rows]


def _replicas(rows: list[Row]) -> list[str]:
    return [f"{r['replicas']} replica(s), {int(_number(r['devices'])):,} thin devices, {r['during the rollout']} "
            f"during the rollout: all SUCCEEDED in {r['deploy→all SUCCEEDED s']} s ({r['devices/min']}/min), "
            f"{r['executions']} executions, {r['devices with >1 execution']} devices with more than one, events "
            f"stored {r['events stored']}"
            + (f", leader hand-over **{r['leader hand-over s']} s**" if r["leader hand-over s"] != "—" else "")
            for r in rows]


def _ingest(rows: list[Row]) -> list[str]:
    return [f"Telemetry ingest into {r['database']}: **{r['bridge+ingest msgs/s']} msgs/s** for {r['phase s']} s, "
            f"{r['lost']} lost = {r['ratio']}x a bare paho subscriber ({r['bare paho msgs/s']} msgs/s)" for r in rows]


def _swap(rows: list[Row]) -> list[str]:
    by = {r["model: phase"]: r for r in rows}
    steady, during = by["digits (swapped): steady state"], by["digits (swapped): in flight during a swap"]
    failed = sum(int(_number(r["failed"])) for r in rows)
    requests = sum(int(_number(r["requests"])) for r in rows)
    return [f"Hot-swap under load, two models served: **{failed} failed** of {requests:,} requests timed around "
            f"the swaps; p99 of the swapped model during swaps {during['p99 ms']} ms vs steady {steady['p99 ms']} ms "
            f"= **{_number(during['p99 ms']) / _number(steady['p99 ms']):.2f}x**"]


def _serving(rows: list[Row]) -> list[str]:
    raw = {r["model"]: r for r in rows if r["mode"] == "raw"}
    return [f"Serving overhead, {r['model']} {r['mode']}: p50 {r['p50 ms']} ms vs raw run "
            f"{raw[r['model']]['p50 ms']} ms = **{r['vs raw p50']}** (+{r['added ms (p50)']} ms)"
            for r in rows if r["mode"] != "raw"]


def _verify(rows: list[Row]) -> list[str]:
    by = {r["method"].split()[0]: r for r in rows}
    tuf = by["TUF"]
    return [f"Verification: TUF download+verify **{tuf['MB/s']} MB/s** = "
            f"{_number(tuf['MB/s']) / _number(by['sha256sum']['MB/s']):.2f}x sha256sum alone "
            f"({by['sha256sum']['MB/s']} MB/s), {_number(tuf['MB/s']) / _number(by['curl']['MB/s']):.2f}x curl alone "
            f"({by['curl']['MB/s']} MB/s)"]


def _footprint(rows: list[Row]) -> list[str]:
    bare = next(r for r in rows if "tuf.ngclient" in r["process"])
    lines = []
    for r in rows:
        if r["process"].startswith("fleet-agent"):
            name = r["process"].split(",")[0].split(" (")[0]
            lines.append(f"Idle footprint, `{name}` with digits: **{r['RSS MiB']} MiB** RSS, {r['idle CPU %']} % CPU "
                         f"= {_number(r['RSS MiB']) / _number(bare['RSS MiB']):.2f}x the bare imports "
                         f"({bare['RSS MiB']} MiB)")
    return lines


def _batching(rows: list[Row]) -> list[str]:
    by = {(r["model"], r["clients"], r["batching"].split()[0]): r for r in rows if "clients" in r}
    lines = []
    for model, clients, setting in by:
        if setting == "on":
            on, off = by[(model, clients, "on")], by[(model, clients, "off")]
            ratio = _number(on["requests/s"]) / _number(off["requests/s"])
            lines.append(f"Dynamic batching, {model}, {clients} client(s): **{on['requests/s']} requests/s** batched "
                         f"vs {off['requests/s']} without = {ratio:.2f}x; p99 {on['p99 ms']} ms vs {off['p99 ms']} ms")
    return lines


def _director(rows: list[Row]) -> list[str]:
    by = {r["step"].split()[0]: r for r in rows}
    return [f"Signed desired states: sign **{by['sign']['median µs']} µs** on the controller, verify "
            f"**{by['verify']['median µs']} µs** on the agent ({by['admit']['median µs']} µs with the fsynced "
            f"generation floor) per desired state"]


def _variants(rows: list[Row]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == model}
        fp32, int8 = by["cpu-fp32"], by["cpu-int8"]
        lines.append(f"int8 on {model}: p50 **{int8['p50 ms']} ms** vs fp32 {fp32['p50 ms']} ms "
                     f"({_number(int8['p50 ms']) / _number(fp32['p50 ms']):.2f}x), size "
                     f"{_number(int8['size KiB']) / _number(fp32['size KiB']):.2f}x, {int8['task metric']} "
                     f"({int8['change (points)']} points): **{int8['build'].split(':')[0]}**")
    return lines


def _security(rows: list[Row]) -> list[str]:
    plain, secured = (r for r in rows if "median ms" in r)
    verify = next(r for r in rows if r.get("step", "").startswith("verify"))
    open_, tls = (r for r in rows if "bridge+ingest msgs/s" in r)
    return [f"Security's cost: MQTT connect {secured['median ms']} ms over TLS with a client certificate vs "
            f"{plain['median ms']} ms plain (**{secured['vs plain']}x**); verify **{verify['median µs']} µs** per "
            f"desired state; ingest {tls['bridge+ingest msgs/s']} vs {open_['bridge+ingest msgs/s']} msgs/s "
            f"on the open broker = **{tls['vs open']}x**, {tls['lost']} lost"]


HEADLINES: dict[str, Callable[[list[Row]], list[str]]] = {
    "fanout": _fanout, "ingest": _ingest, "swap": _swap, "serving": _serving, "verify": _verify,
    "footprint": _footprint, "director": _director, "variants": _variants, "security": _security,
    "batching": _batching, "replicas": _replicas,
}


def headlines(kind: str, stdout: str) -> list[str]:
    rows = [row for table in tables(stdout) for row in table]
    try:
        return HEADLINES[kind](rows)
    except (KeyError, StopIteration, ValueError, ZeroDivisionError) as e:
        return [f"{kind}: the table could not be read back ({type(e).__name__}: {e}); see its section"]


@dataclass(frozen=True)
class Section:
    """How RESULTS.md shows one benchmark."""

    key: str          # file name of its saved run
    kind: str         # which headline reader applies
    title: str
    reproduce: str    # the exact command, as a reader would type it
    note: str = ""


def render(machine: Machine, sections: list[Section], runs: dict[str, Run], whole_command: str,
           notes: dict[str, str] | None = None) -> str:
    """RESULTS.md; ``notes`` (by section key) are written by hand after a run, e.g. what a failed run reached."""
    notes = notes or {}
    peak = max((max(run.load_peak or 0.0, run.load_before[0], run.load_after[0]) for run in runs.values()),
               default=0.0)
    lines = [
        "# edgefleet benchmark results",
        "",
        f"Regenerated by `{whole_command}` (bench/run_all.py) from the runs' captured output; every figure below "
        "comes from a run on this machine, each benchmark against its baseline measured in the same run.",
        "",
        machine.markdown(),
        "",
        "Code measured: "
        + ", ".join(sorted({run.code or "not recorded" for run in runs.values()}))
        + " (per run below).",
        "",
        f"Load: this machine is shared with other engineers' test runs; the highest 1-minute load average recorded "
        f"around the benchmarks (before and after each run, and sampled during it where shown) was {peak:.2f} on "
        f"{machine.cores} cores (per benchmark below). Figures that depend "
        "on free CPU (fan-out, ingest, latencies) are lower bounds for an idle machine.",
        "",
        "## Headline ratios",
        "",
    ]
    for section in sections:
        run = runs.get(section.key)
        if run is None:
            lines.append(f"- {section.title}: not run yet (`{section.reproduce}`)")
        elif not run.ok:
            lines.append(f"- {section.title}: **did not complete** (exit {run.returncode}); see its section"
                         + (" for the progress it made" if section.key in notes else ""))
        else:
            lines += [f"- {line}" for line in headlines(section.kind, run.stdout)]
    for section in sections:
        lines += ["", f"## {section.title}", "", f"Reproduce: `{section.reproduce}`", ""]
        if section.note:
            lines += [section.note, ""]
        run = runs.get(section.key)
        if run is None:
            lines.append("Not run yet.")
            continue
        during = "" if run.load_peak is None else f", peak {run.load_peak:.2f} during"
        lines += [f"Run {run.started} on {run.code or 'unrecorded code'}, {run.seconds:.0f} s, {run.size} size; "
                  f"load average (1/5/15 min) {_load(run.load_before)} before, {_load(run.load_after)} after{during}.",
                  ""]
        if run.stdout.strip():
            lines += [run.stdout.strip(), ""]
        if not run.ok:
            lines += [f"**Did not complete** (exit {run.returncode}). Last lines of its error output:", "", "```",
                      run.stderr_tail.strip(), "```", ""]
        if section.key in notes:
            lines += [f"Note (bench/notes/{section.key}.md): " + notes[section.key].strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)
