"""``make demo-ocr``: a real pretrained model's variants, their frontier per hardware class, and a floor.

PP-OCR's text-direction classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx`` from rapidocr's wheel,
fetched by ``make models``) is built into cpu-fp32 and cpu-int8 variants scored on a rendered,
labelled held-out set (0 upright, 1 turned 180 degrees). The int8 variant is calibrated on blank
images and built with a loose bound (``--max-drop 100``), so it is accepted but loses top-1. A real
controller and two real agents, faked to hardware classes x86_64 and rpi-4, then:

1. take a rollout without a floor: the planner, with no evidence yet, picks by declared preference
   (int8 on both classes), and the devices' on-device benchmarks become the frontier's latency;
2. ``deploy --dry-run --min-accuracy`` explains that the floor rules int8 out;
3. the floored rollout moves both devices to fp32, and ``models frontier`` shows both variants
   measured on both classes, the frontier and the pick per class.

The end-to-end test (tests/test_ocr_e2e.py) runs these same steps. Exits 0 only when every
step went as it should.

    python -m demo.ocr [--api-port 8470] [--broker-port 1884] [--keep]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .scenario import (
    AgentProcess,
    Controller,
    Echo,
    Fleetctl,
    ScenarioError,
    quiet,
    run_demo,
    wait_for_fleet,
    wait_rollout,
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
NAME = "ocr-cls"
VERSION = "1.0.0"
TARGET = f"{NAME}:{VERSION}"
CLASSES = ("x86_64", "rpi-4")
SELECTOR = "hw.class in (x86_64,rpi-4)"
ROLLOUT = ["--stages", "100%", "--bake", "0s", "--device-timeout", "2m", "--max-p99-regression", "1000%"]
FLOOR = "95%"
EVAL, CALIBRATION = 200, 8  # rendered held-out and calibration samples (bench/ocr.py caches them by count)


def build_classifier(fleetctl: Fleetctl, work: Path, model_cache: Path) -> dict[str, Any]:
    """Build and publish the classifier's cpu-fp32 and cpu-int8 variants; the build report."""
    from bench import ocr

    files = ocr.task_set(model_cache, "cls", EVAL, CALIBRATION)
    blank = work / "blank-calibration.npz"
    np.savez(blank, x=np.zeros((4, 3, *ocr.CLS_SHAPE), np.float32))
    bundle = work / f"{NAME}-{VERSION}"
    fleetctl("bundle", "build", str(files.model), "--name", NAME, "--version", VERSION,
             "--variant", "cpu-fp32", "--variant", "cpu-int8", "--calibration", str(blank),
             "--eval", str(files.eval_data), "--max-drop", "100", "-o", str(bundle))
    fleetctl("bundle", "publish", str(bundle))
    report: dict[str, Any] = json.loads((bundle / "report.json").read_text())
    return report


@dataclass(frozen=True)
class Ports:
    api: int
    broker: int  # the controller's embedded MQTT broker
    agents: tuple[int, int]  # the agents' inference servers, one per class


@dataclass
class OcrFleet:
    fleetctl: Fleetctl
    controller: Controller
    agents: dict[str, AgentProcess]  # by hardware class
    report: dict[str, Any]  # the classifier's build report


@contextlib.contextmanager
def ocr_fleet(work: Path, model_cache: Path, ports: Callable[[], Ports],
              echo: Echo = quiet, step: Echo = quiet) -> Iterator[OcrFleet]:
    """A fleet home with the classifier built and published, its controller, and one agent per class.

    ``ports`` is asked again after the build, which takes a while: a test's free ports are
    chosen just before the controller and agents take them.
    """
    home = work / "home"
    fleetctl = Fleetctl(home, echo=echo)
    provisional = ports()
    write_config(home, provisional.api, embedded_broker_port=provisional.broker)
    fleetctl("init")
    step(f"Build PP-OCR's text-direction classifier into cpu-fp32 and cpu-int8, scored on {EVAL} rendered, "
         "labelled text lines")
    echo("(int8 is calibrated on blank images and built with --max-drop 100: accepted, but it loses top-1)")
    report = build_classifier(fleetctl, work, model_cache)

    step(f"Start the controller and two real agents, faked to hardware classes {' and '.join(CLASSES)}")
    chosen = ports()
    write_config(home, chosen.api, embedded_broker_port=chosen.broker)
    controller = Controller(home, f"http://127.0.0.1:{chosen.api}").start()
    run = uuid.uuid4().hex[:6]
    agents = {cls: AgentProcess(f"{cls.replace('_', '')}-ocr-{run}", cls, work / f"agent-{cls}", port)
              for cls, port in zip(CLASSES, chosen.agents, strict=True)}
    try:
        for agent in agents.values():
            agent.enroll(fleetctl, controller.url).start()
        wait_for_fleet(fleetctl, {a.name: a.hw_class for a in agents.values()})
        fleetctl("devices", "list")
        yield OcrFleet(fleetctl, controller, agents, report)
    finally:
        for agent in agents.values():
            agent.stop()
        controller.stop()


@dataclass
class Story:
    first: dict[str, Any]  # the frontier after the rollout without a floor (json)
    plan: str  # the floored dry run, as printed
    floored: dict[str, Any]  # the frontier after the floored rollout, with the floor (json)
    printed: str  # that frontier as printed
    accurate: dict[str, Any]  # the floored rollout's final status


def frontier_story(fleet: OcrFleet, step: Echo = quiet, png: Path | None = None) -> Story:
    """Deploy without a floor, read the frontier, explain a floor, deploy with it, read it again."""
    fleetctl = fleet.fleetctl
    step("Deploy without an accuracy floor: the planner picks by preference, devices benchmark it")
    fleetctl("deploy", TARGET, "--to", SELECTOR, "--name", "fast", *ROLLOUT)
    fast = wait_rollout(fleetctl, "fast")
    _expect(fast["state"] == "SUCCEEDED", f"rollout fast ended {fast['state']}: {fast['detail']}")
    fleetctl("models", "frontier", TARGET)
    first = fleetctl.json("models", "frontier", TARGET)

    step(f"Ask what a floor of {FLOOR} top-1 would change (--dry-run)")
    plan = fleetctl("deploy", TARGET, "--to", SELECTOR, "--min-accuracy", FLOOR, "--dry-run", *ROLLOUT)

    step(f"Deploy with --min-accuracy {FLOOR}: both classes move to the accurate variant")
    fleetctl("deploy", TARGET, "--to", SELECTOR, "--name", "accurate", "--min-accuracy", FLOOR, *ROLLOUT)
    accurate = wait_rollout(fleetctl, "accurate")
    _expect(accurate["state"] == "SUCCEEDED", f"rollout accurate ended {accurate['state']}: {accurate['detail']}")
    fleetctl("rollout", "status", "accurate")

    step("The frontier per hardware class, both variants measured on devices of both classes")
    png_args = ["--png", str(png)] if png is not None else []
    printed = fleetctl("models", "frontier", TARGET, "--min-accuracy", FLOOR, *png_args)
    floored = fleetctl.json("models", "frontier", TARGET, "--min-accuracy", FLOOR)
    return Story(first, plan, floored, printed, accurate)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioError(message)


def points(frontier: dict[str, Any], cls: str) -> dict[str, dict[str, Any]]:
    return {p["variant"]: p for p in frontier["classes"][cls]}


def check(story: Story) -> str:
    """The story's promises; a one-line summary of its real numbers."""
    picks = []
    for cls in CLASSES:
        measured = points(story.floored, cls)
        _expect(all(p["devices"] >= 1 and (p["p99_ms"] or 0) > 0 for p in measured.values()),
                f"{cls}: not every variant was measured on a device: {measured}")
        fp32 = measured["cpu-fp32"]
        _expect(fp32["picked"] and not measured["cpu-int8"]["picked"], f"{cls}: the floor did not pick fp32")
        picks.append(f"{cls} fp32 p50 {fp32['p50_ms']:.2f} ms")
    _expect("below the floor" in story.plan, "the dry run did not explain the floor")
    fp32 = points(story.floored, CLASSES[0])["cpu-fp32"]
    int8 = points(story.floored, CLASSES[0])["cpu-int8"]
    return (f"{NAME} top-1 fp32 {fp32['accuracy']:.1%} vs int8 {int8['accuracy']:.1%}; "
            f"floor {FLOOR} picked {', '.join(picks)}")


def main(argv: list[str] | None = None) -> int:
    from .__main__ import Narrator

    parser = argparse.ArgumentParser(prog="python -m demo.ocr", description=__doc__.splitlines()[0])
    parser.add_argument("--api-port", type=int, default=8470)
    parser.add_argument("--broker-port", type=int, default=1884)
    parser.add_argument("--agent-ports", default="8481,8482", help="the two agents' inference ports")
    parser.add_argument("--model-cache", default=os.environ.get("EDGEFLEET_MODEL_CACHE", REPO / ".cache" / "models"))
    parser.add_argument("--keep", action="store_true", help="keep the demo's fleet home and files")
    args = parser.parse_args(argv)
    first, second = (int(p) for p in args.agent_ports.split(","))
    ports = Ports(args.api_port, args.broker_port, (first, second))
    narrator = Narrator()

    def body(work: Path) -> None:
        with ocr_fleet(work, Path(args.model_cache), lambda: ports, echo=narrator.say,
                       step=narrator.section) as fleet:
            summary = check(frontier_story(fleet, step=narrator.section, png=work / "frontier.png"))
        narrator.say(f"\ndemo-ocr finished in {time.monotonic() - narrator.started:.0f}s: {summary}")

    return run_demo("demo-ocr", body, "{work}/home/controller.log, {work}/agent-*/agent.log", args.keep)


if __name__ == "__main__":
    sys.exit(main())
