"""The frontier end to end: a real controller process and two real agent processes in two
simulated hardware classes serve PP-OCR's pretrained text-direction classifier.

The bundle's int8 variant was calibrated on blank images and built with a loose bound
(--max-drop 100), so it is fast but loses top-1; the fp32 variant keeps it.

1. Without a floor the planner has no evidence and picks by preference: int8 on both classes;
   the devices' on-device benchmarks become the frontier's latency for int8.
2. `deploy --dry-run --min-accuracy` explains that the floor rules int8 out.
3. The floored rollout moves both devices to fp32; now both variants are measured on both
   classes, and `models frontier` marks the frontier and the pick per class (and draws it).
"""
import json
import uuid

import numpy as np
import pytest

from bench import ocr
from demo.scenario import AgentProcess, Controller, Fleetctl, wait_for_fleet, wait_rollout, write_config
from tests.conftest import free_port, ocr_set

pytestmark = pytest.mark.slow
ROLLOUT = ["--stages", "100%", "--bake", "0s", "--device-timeout", "2m", "--max-p99-regression", "1000%"]
FLOOR = "95%"


@pytest.fixture
def fleet(tmp_path, ocr_models, model_cache):
    files = ocr_set(model_cache, "cls", 32, 8)
    blank = tmp_path / "blank.npz"
    np.savez(blank, x=np.zeros((4, 3, *ocr.CLS_SHAPE), np.float32))
    home = tmp_path / "home"
    api_port = free_port()
    write_config(home, api_port, embedded_broker_port=free_port())
    fleetctl = Fleetctl(home, echo=print)
    fleetctl("init")
    bundle = tmp_path / "textdir-1.0.0"
    fleetctl("bundle", "build", str(files.model), "--name", "textdir", "--version", "1.0.0",
             "--variant", "cpu-fp32", "--variant", "cpu-int8", "--calibration", str(blank),
             "--eval", str(files.eval_data), "--max-drop", "100", "-o", str(bundle))
    controller = Controller(home, f"http://127.0.0.1:{api_port}").start()
    run = uuid.uuid4().hex[:6]
    agents = [AgentProcess(f"{cls.replace('_', '')}-f-{run}", cls, tmp_path / f"agent-{cls}", free_port())
              for cls in ("x86_64", "rpi-4")]
    try:
        fleetctl("bundle", "publish", str(bundle))
        for agent in agents:
            agent.enroll(fleetctl, controller.url).start()
        wait_for_fleet(fleetctl, {a.name: a.hw_class for a in agents})
        yield fleetctl, json.loads((bundle / "report.json").read_text())
    finally:
        for agent in agents:
            agent.stop()
        controller.stop()


def _points(frontier: dict, cls: str) -> dict[str, dict]:
    return {p["variant"]: p for p in frontier["classes"][cls]}


def test_frontier_from_two_hardware_classes(fleet, tmp_path):
    fleetctl, report = fleet
    accuracy = {v["variant"]: v["accuracy"]["top1"] for v in report["variants"]}
    assert accuracy["cpu-int8"] < 0.95 <= accuracy["cpu-fp32"], accuracy  # the premise of the story

    fleetctl("deploy", "textdir:1.0.0", "--to", "hw.class in (x86_64,rpi-4)", "--name", "fast", *ROLLOUT)
    assert wait_rollout(fleetctl, "fast")["state"] == "SUCCEEDED"
    first = fleetctl.json("models", "frontier", "textdir:1.0.0")
    for cls in ("x86_64", "rpi-4"):
        int8, fp32 = _points(first, cls)["cpu-int8"], _points(first, cls)["cpu-fp32"]
        assert int8["devices"] == 1 and 0 < int8["p50_ms"] <= int8["p99_ms"] and int8["picked"]
        assert int8["accuracy"] == accuracy["cpu-int8"] and int8["metric"] == "top1"
        assert fp32["p99_ms"] is None and not fp32["on_frontier"] and "no device" in fp32["note"]

    plan = fleetctl("deploy", "textdir:1.0.0", "--to", "hw.class in (x86_64,rpi-4)", "--min-accuracy", FLOOR,
                    "--dry-run", *ROLLOUT)
    assert "cpu-fp32" in plan and "below the floor 0.95" in plan and "dry run" in plan

    fleetctl("deploy", "textdir:1.0.0", "--to", "hw.class in (x86_64,rpi-4)", "--name", "accurate",
             "--min-accuracy", FLOOR, *ROLLOUT)
    assert wait_rollout(fleetctl, "accurate")["state"] == "SUCCEEDED"
    png = tmp_path / "frontier.png"
    printed = fleetctl("models", "frontier", "textdir:1.0.0", "--min-accuracy", FLOOR, "--png", str(png))
    print(printed)
    assert "<- pick" in printed and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    floored = fleetctl.json("models", "frontier", "textdir:1.0.0", "--min-accuracy", FLOOR)
    for cls in ("x86_64", "rpi-4"):
        points = _points(floored, cls)
        assert all(p["devices"] == 1 and p["p99_ms"] > 0 for p in points.values()), points  # both measured here
        assert points["cpu-fp32"]["picked"] and not points["cpu-int8"]["picked"]
        assert points["cpu-fp32"]["on_frontier"]  # the most accurate is never dominated
        # int8 is on the frontier exactly when it measured faster than fp32 on this class
        faster = points["cpu-int8"]["p99_ms"] < points["cpu-fp32"]["p99_ms"]
        assert points["cpu-int8"]["on_frontier"] == faster
