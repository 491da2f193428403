"""``make demo``: edgefleet end to end on one machine, with the embedded defaults.

Creates a fleet home and keys, builds and signs the digits model's variants,
starts the controller (in-process MQTT broker, SQLite, local store) and a
simulated fleet in two hardware classes, rolls a good version out stage by
stage, then lets the canary stop a bad one and roll it back. Exits 0 only when
every step went as it should, so it doubles as a smoke test.

    python -m demo [--devices 12] [--api-port 8470] [--broker-port 1884] [--keep]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import models

from .scenario import (
    BIN,
    Controller,
    Fleetctl,
    ScenarioError,
    build_bundles,
    run_demo,
    stop_process,
    wait_for,
    wait_for_fleet,
    wait_rollout,
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("x86_64", "rpi-4")
SELECTOR = "fleet=demo"
STAGES = ["--stages", "25%,50%,100%", "--bake", "3s", "--min-devices-per-stage", "1"]
SAMPLING = ["--sample-rate", "20%", "--sample-low-confidence", "0.9"]


class Narrator:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.step = 0

    def section(self, title: str) -> None:
        self.step += 1
        print(f"\n=== [{time.monotonic() - self.started:5.1f}s] {self.step}. {title}", flush=True)

    def say(self, text: str) -> None:
        print(text, flush=True)


def progress_line(status: dict) -> str:
    """One line per change: where the rollout is, per stage and hardware class."""
    parts = [f"{status['id']} {status['state']} stage {status['stage'] + 1}/{len(status['progress'])}"]
    for stage in status["progress"]:
        for cls, counts in stage["classes"].items():
            states = ",".join(f"{s}={n}" for s, n in sorted(counts["states"].items()))
            parts.append(f"s{stage['stage'] + 1}/{cls} {counts['done']}/{counts['total']} {states}")
    return "  " + " | ".join(parts)


def gate_lines(status: dict, shown: set) -> list[str]:
    lines = []
    for gate in status["gates"]:
        key = (gate["stage"], gate["hardware_class"], gate["gate"], gate["verdict"])
        if key in shown or gate["verdict"] == "NO_DATA":
            continue
        shown.add(key)
        value = "-" if gate["value"] is None else f"{gate['value']:.3g}"
        lines.append(f"  gate stage {gate['stage'] + 1} {gate['hardware_class']:7} {gate['gate']:16} "
                     f"value {value:>8}  limit {gate['threshold']:.3g}  {gate['verdict']}")
    return lines


def follow(fleetctl: Fleetctl, rollout: str, narrator: Narrator, timeout: float) -> dict:
    shown: set = set()

    def changed(status: dict) -> None:
        narrator.say(progress_line(status))
        for line in gate_lines(status, shown):
            narrator.say(line)

    return wait_rollout(fleetctl, rollout, timeout, on_change=changed)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioError(message)


def run(args: argparse.Namespace, work: Path) -> None:
    narrator = Narrator()
    home = work / "home"
    fleetctl = Fleetctl(home, echo=narrator.say)

    narrator.section("Create a fleet home: config, TUF keys (root, targets, snapshot, timestamp), database")
    write_config(home, args.api_port, embedded_broker_port=args.broker_port)
    fleetctl("init")

    narrator.section("Build the digits model's hardware variants: a good 1.0.0 and a bad 1.1.0")
    narrator.say("(1.1.0's int8 variant is ~30x slower; its fp32 variant fails its golden set)")
    bundles = build_bundles(fleetctl, work / "bundles", Path(args.model_cache),
                            good_versions=("1.0.0",), bad_version="1.1.0")

    narrator.section("Start the controller: embedded MQTT broker, SQLite, local artifact store")
    controller = Controller(home, f"http://127.0.0.1:{args.api_port}").start()
    fleet = None
    try:
        narrator.say(f"controller API and TUF repository at {controller.url}; MQTT at 127.0.0.1:{args.broker_port}")
        for bundle in (*bundles.good, bundles.bad):
            fleetctl("bundle", "publish", str(bundle))
        fleetctl("models", "list")

        narrator.section(f"Start a simulated fleet: {args.devices} devices in classes {', '.join(CLASSES)}")
        with open(work / "simulator.log", "wb") as log:
            fleet = subprocess.Popen(
                [str(BIN / "python"), "-m", "edgefleet.simulator", "--controller", controller.url,
                 "--devices", str(args.devices), "--classes", ",".join(CLASSES), "--prefix", "demo",
                 "--workers", "4", "--heartbeat", "2", "--requests-per-s", "2", "--upload-interval", "3",
                 "--inputs", str(models.digits(Path(args.model_cache)).eval_data),
                 "--state-root", str(work / "devices"), "--status-interval", "3600"],
                env=fleetctl.env, stdout=subprocess.DEVNULL, stderr=log,
            )
        devices = wait_for_fleet(fleetctl, expected_classes(args.devices), timeout=90)
        narrator.say(f"{len(devices)} devices online, enrolled through the API with one-time tokens")
        fleetctl("devices", "list")

        narrator.section("Roll out digits 1.0.0 in stages 25% -> 50% -> 100%, gated on how it runs on devices")
        fleetctl("deploy", "digits:1.0.0", "--to", SELECTOR, "--name", "digits-1.0.0", *STAGES, *SAMPLING,
                 "--dry-run")
        fleetctl("deploy", "digits:1.0.0", "--to", SELECTOR, "--name", "digits-1.0.0", *STAGES, *SAMPLING)
        good = follow(fleetctl, "digits-1.0.0", narrator, timeout=180)
        expect(good["state"] == "SUCCEEDED", f"digits 1.0.0 ended {good['state']}: {good['detail']}")

        narrator.section("Roll out digits 1.1.0: the canary stage should catch it and roll it back")
        fleetctl("deploy", "digits:1.1.0", "--to", SELECTOR, "--name", "digits-1.1.0", *STAGES, *SAMPLING)
        bad = follow(fleetctl, "digits-1.1.0", narrator, timeout=180)
        expect(bad["state"] in ("FAILED", "ROLLED_BACK"), f"digits 1.1.0 ended {bad['state']}, not stopped")
        expect(bad["stage"] == 0, f"digits 1.1.0 got past the canary (stage {bad['stage'] + 1})")
        failed = {g["hardware_class"] for g in bad["gates"] if g["verdict"] == "FAIL"}
        expect(failed == set(CLASSES), f"gates failed for {sorted(failed)}, expected both classes")
        wait_for(lambda: all([m["version"] for m in d["active"]] == ["1.0.0"]
                             for d in fleetctl.json("devices", "list", "--selector", SELECTOR)),
                 60, "every device back on digits 1.0.0")

        narrator.section("Where things stand")
        fleetctl("rollout", "status", "digits-1.1.0")
        fleetctl("devices", "list")

        narrator.section("Sampled production data, ready for retraining")
        wait_for(lambda: _sample_count(fleetctl) > 0, 60, "devices to upload sampled production data")
        fleetctl("data", "stats")
        export = work / "dataset"
        fleetctl("data", "export", "--model", "digits", "-o", str(export))
        files = sorted(p.name for p in export.iterdir())
        narrator.say(f"{export}: {', '.join(files)}")
        expect(any(f.endswith(".npz") for f in files) and "index.jsonl" in files, "export wrote no dataset")
        narrator.say(f"\ndemo finished in {time.monotonic() - narrator.started:.0f}s: all steps went as expected")
    finally:
        stop_process(fleet, 30)
        controller.stop()


def expected_classes(devices: int) -> dict[str, str]:
    """The simulator deals classes round-robin and names devices PREFIX-CLASS-NNNNN."""
    return {f"demo-{CLASSES[i % len(CLASSES)]}-{i:05d}": CLASSES[i % len(CLASSES)] for i in range(devices)}


def _sample_count(fleetctl: Fleetctl) -> int:
    return sum(group["samples"] for group in fleetctl.json("data", "stats")["groups"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=12)
    parser.add_argument("--api-port", type=int, default=8470)
    parser.add_argument("--broker-port", type=int, default=1884)
    parser.add_argument("--model-cache", default=os.environ.get("EDGEFLEET_MODEL_CACHE", REPO / ".cache" / "models"))
    parser.add_argument("--keep", action="store_true", help="keep the demo's fleet home and files")
    args = parser.parse_args(argv)
    return run_demo("demo", lambda work: run(args, work), "{work}/home/controller.log, {work}/simulator.log",
                    args.keep)


if __name__ == "__main__":
    sys.exit(main())
