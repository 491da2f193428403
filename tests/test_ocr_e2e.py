"""PP-OCR's pretrained models end to end, on one fleet: a real controller process and two real
agent processes in two simulated hardware classes (x86_64, rpi-4).

The frontier of the text-direction classifier is `make demo-ocr`'s story (demo/ocr.py): the
fleet is the demo's, and the first test runs the demo's steps and checks what they promise.

The pipeline (``ocr``: detector, classifier and recognizer merged by `fleetctl bundle pipeline`):

4. ocr 1.0.0 installs on the x86 device as one unit: one signed target, and the device serves
   every member's inputs and outputs under its name.
5. ocr 1.1.0's recognizer is wrong where only a device sees it (its part of the golden set is
   shifted): the device's gate refuses the whole unit, the rollout stops, and the device still
   serves 1.0.0's detector, classifier and recognizer together.
"""
import json
import shutil
import urllib.request

import numpy as np
import pytest

from demo import ocr as demo
from demo.scenario import AgentProcess, Fleetctl, wait_for, wait_rollout
from edgefleet.common.golden import GoldenSet
from edgefleet.controller.bundle.build import build_bundle
from tests.conftest import free_port, ocr_set

pytestmark = pytest.mark.slow
ROLLOUT = demo.ROLLOUT
MEMBERS = {"det": (4, 2), "cls": (8, 4), "rec": (6, 2)}  # (eval, calibration) samples of each pipeline member


def _spoil_member(bundle, member: str) -> None:
    """Shift one member's expected outputs in the pipeline's golden set."""
    report = json.loads((bundle / "report.json").read_text())
    for entry in report["variants"]:
        path = bundle / entry["golden"]
        golden = GoldenSet.load(path)
        outputs = {k: np.roll(v, 1, axis=-1) if k.startswith(f"{member}/") else v for k, v in golden.outputs.items()}
        GoldenSet(golden.inputs, outputs, golden.atol, golden.rtol, golden.top1).save(path)


def _served(agent: AgentProcess) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.serve_port}/v2/models/ocr", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _ocr_pipeline(fleetctl: Fleetctl, tmp_path, model_cache) -> None:
    """ocr 1.0.0, and 1.1.0: the same models with the recognizer's golden outputs shifted."""
    members = {}
    for task, sizes in MEMBERS.items():
        files = ocr_set(model_cache, task, *sizes)
        members[task] = tmp_path / f"member-{task}"
        build_bundle(files.model, f"ocr-{task}", "1.0.0", ["cpu-fp32"], files.calibration_data, files.eval_data,
                     members[task], latency_budget_s=0.05, latency_runs=5)
    member_args = [a for m, path in members.items() for a in ("--member", f"{m}={path}")]
    bundles = {version: tmp_path / f"ocr-{version}" for version in ("1.0.0", "1.1.0")}
    fleetctl("bundle", "pipeline", "--name", "ocr", "--version", "1.0.0", *member_args, "-o", str(bundles["1.0.0"]))
    shutil.copytree(bundles["1.0.0"], bundles["1.1.0"])  # the same models; publish signs them as 1.1.0
    report = bundles["1.1.0"] / "report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "version": "1.1.0"}))
    _spoil_member(bundles["1.1.0"], "rec")
    for bundle in bundles.values():
        fleetctl("bundle", "publish", str(bundle))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, ocr_models, model_cache):
    tmp_path = tmp_path_factory.mktemp("ocr-fleet")

    def ports() -> demo.Ports:
        return demo.Ports(free_port(), free_port(), (free_port(), free_port()))

    with demo.ocr_fleet(tmp_path, model_cache, ports, echo=print, step=print) as ocr_fleet:
        _ocr_pipeline(ocr_fleet.fleetctl, tmp_path, model_cache)
        yield ocr_fleet


def test_demo_ocr_frontier_from_two_hardware_classes(fleet, tmp_path):
    """`make demo-ocr`'s story: the frontier per class from devices' benchmarks, and a floor."""
    accuracy = {v["variant"]: v["accuracy"]["top1"] for v in fleet.report["variants"]}
    assert accuracy["cpu-int8"] < 0.95 <= accuracy["cpu-fp32"], accuracy  # the premise of the story

    png = tmp_path / "frontier.png"
    story = demo.frontier_story(fleet, step=print, png=png)
    summary = demo.check(story)
    assert "top-1 fp32" in summary and "x86_64 fp32 p50" in summary and "rpi-4 fp32 p50" in summary, summary
    for cls in demo.CLASSES:
        int8, fp32 = demo.points(story.first, cls)["cpu-int8"], demo.points(story.first, cls)["cpu-fp32"]
        assert int8["devices"] == 1 and 0 < int8["p50_ms"] <= int8["p99_ms"] and int8["picked"]
        assert int8["accuracy"] == accuracy["cpu-int8"] and int8["metric"] == "top1"
        assert fp32["p99_ms"] is None and not fp32["on_frontier"] and "no device" in fp32["note"]

    assert "cpu-fp32" in story.plan and "below the floor 0.95" in story.plan and "dry run" in story.plan
    assert "<- pick" in story.printed and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {g["hardware_class"] for g in story.accurate["gates"] if g["verdict"] == "PASS"} == set(demo.CLASSES)
    for cls in demo.CLASSES:
        points = demo.points(story.floored, cls)
        assert all(p["devices"] == 1 and p["p99_ms"] > 0 for p in points.values()), points  # both measured here
        assert points["cpu-fp32"]["picked"] and not points["cpu-int8"]["picked"]
        assert points["cpu-fp32"]["on_frontier"]  # the most accurate is never dominated
        # int8 is on the frontier exactly when it measured faster than fp32 on this class
        faster = points["cpu-int8"]["p99_ms"] < points["cpu-fp32"]["p99_ms"]
        assert points["cpu-int8"]["on_frontier"] == faster


def test_pipeline_installs_gates_and_rolls_back_as_one_unit(fleet):
    fleetctl, agent = fleet.fleetctl, fleet.agents["x86_64"]
    variants = fleetctl.json("models", "show", "ocr")["versions"][0]["variants"]
    assert [v["variant"] for v in variants] == ["cpu-fp32"]  # one signed target per variant: the unit
    assert {"det.box_f1", "cls.top1", "rec.exact_match"} <= set(variants[0]["accuracy"])

    fleetctl("deploy", "ocr:1.0.0", "--to", "hw.class in (x86_64)", "--name", "ocr-1", *ROLLOUT)
    assert wait_rollout(fleetctl, "ocr-1")["state"] == "SUCCEEDED", agent.log()
    served = wait_for(lambda: _served(agent), 30, "the pipeline to be served", agent.log)
    members = {t["name"].split("/")[0] for t in served["inputs"]}
    assert served["versions"] == ["1.0.0"] and members == set(MEMBERS)
    assert {t["name"].split("/")[0] for t in served["outputs"]} == set(MEMBERS)

    fleetctl("deploy", "ocr:1.1.0", "--to", "hw.class in (x86_64)", "--name", "ocr-2", *ROLLOUT)
    second = wait_rollout(fleetctl, "ocr-2")
    assert second["state"] in ("FAILED", "ROLLED_BACK"), second
    (execution,) = second["executions"]
    assert "golden set failed" in execution["detail"] and "rec/" in execution["detail"], execution
    after = _served(agent)
    assert after["versions"] == ["1.0.0"] and {t["name"].split("/")[0] for t in after["inputs"]} == set(MEMBERS)
    (device,) = [d for d in fleetctl.json("devices", "list") if d["id"] == agent.name]
    # the pipeline is a model of its own: whatever else the device serves (the frontier test's
    # ocr-cls, when it ran first) is untouched
    assert ("ocr", "1.0.0") in [(m["model"], m["version"]) for m in device["active"]]
