"""The operator's dashboard in a real headless Chromium (Debian's ``chromium``), against a real
controller process (``fleetctl controller run``) and a simulated fleet of real agents in two
hardware classes: log in with a token, watch a rollout's page change as its stages progress
without reloading it, steer the rollout with its buttons (the API confirms each change), and
load every page with no console error and no request that leaves the controller, /docs too.

Screenshots go to $EDGEFLEET_SCREENSHOT_DIR when set (the README's are refreshed with
``EDGEFLEET_SCREENSHOT_DIR=docs/screenshots``), else into the test's temporary folder.
"""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import httpx
import pytest

from demo.scenario import BIN, Controller, Fleetctl, stop_process, wait_for, wait_for_fleet, write_config
from tests.conftest import free_port, need_program
from tests.support.browser import Browser, Page

pytestmark = pytest.mark.slow

CLASSES = ("x86_64", "rpi-4")
DEVICES = 4
DEVICE_IDS = {f"ui-{CLASSES[i % 2]}-{i:05d}": CLASSES[i % 2] for i in range(DEVICES)}
# a bake long enough that only the buttons move the rollout on
DEPLOY = ["deploy", "digits:1.0.0", "--to", "fleet=ui", "--name", "ui-1", "--stages", "50%,100%", "--bake", "10m",
          "--min-devices-per-stage", "1", "--sample-rate", "50%"]


@pytest.fixture
def chromium() -> str:
    return need_program("chromium", "apt-get install chromium")


@pytest.fixture
def fleet(tmp_path, model_cache):
    """A controller with digits 1.0.0 published and four simulated devices online, nothing installed."""
    from bench import models

    home = tmp_path / "home"
    port = free_port()
    write_config(home, port, embedded_broker_port=free_port())
    fleetctl = Fleetctl(home)
    fleetctl("init")
    digits = models.digits(model_cache)
    bundle = tmp_path / "digits-1.0.0"
    fleetctl("bundle", "build", str(digits.model), "--name", "digits", "--version", "1.0.0",
             "--variant", "cpu-fp32", "--variant", "cpu-int8", "--calibration", str(digits.calibration_data),
             "--eval", str(digits.eval_data), "-o", str(bundle))
    fleetctl("bundle", "publish", str(bundle))
    controller = Controller(home, f"http://127.0.0.1:{port}").start()
    simulator = None
    try:
        with open(tmp_path / "simulator.log", "wb") as log:
            simulator = subprocess.Popen(
                [str(BIN / "python"), "-m", "edgefleet.simulator", "--controller", controller.url,
                 "--devices", str(DEVICES), "--classes", ",".join(CLASSES), "--prefix", "ui", "--workers", "2",
                 "--heartbeat", "1", "--requests-per-s", "5", "--upload-interval", "2",
                 "--inputs", str(digits.eval_data), "--state-root", str(tmp_path / "devices"),
                 "--status-interval", "3600"],
                env=fleetctl.env, stdout=subprocess.DEVNULL, stderr=log,
            )
        wait_for_fleet(fleetctl, DEVICE_IDS, timeout=60)
        yield fleetctl, controller
    finally:
        stop_process(simulator, 20)
        controller.stop()


@pytest.fixture
def shots(tmp_path) -> Path:
    return Path(os.environ.get("EDGEFLEET_SCREENSHOT_DIR") or tmp_path / "screenshots")


def show(page: Page, hash_: str, ready: str) -> None:
    """Go to a dashboard page (no reload: the app routes on the hash) and wait until it shows ``ready``."""
    page.evaluate(f"location.hash = {hash_!r}")
    page.wait_for(f"location.hash === {hash_!r} && ({ready})", 60)


def log_in(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/")
    page.wait_for("!!document.querySelector('#token')")
    page.fill("#token", token)
    page.click("form button[type=submit]")


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", png[16:24])


def stage_text(page: Page) -> str:
    return page.text(".stages")


def test_dashboard_follows_and_steers_a_rollout(fleet, chromium, tmp_path, shots):
    fleetctl, controller = fleet
    url = controller.url
    admin = (fleetctl.home / "operator-token").read_text().strip()
    viewer = fleetctl.json("tokens", "create", "watcher", "--role", "viewer")["token"]

    with Browser.launch(chromium, tmp_path / "chromium") as page, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as api:
        # a token the controller does not know is refused on the login page
        log_in(page, url, "efo_not-a-token")
        page.wait_for("document.querySelector('#login-error')?.textContent.includes('operator token is not valid')")
        page.errors.clear()  # the refused call is logged by the browser as a failed load

        log_in(page, url, admin)
        page.wait_for("location.hash === '#/fleet' && !!document.querySelector('#fleet-summary')")
        page.wait_for(f"document.querySelector('#fleet-summary').textContent.startsWith('{DEVICES} devices, {DEVICES} online')")
        assert all(cls in page.text("main") for cls in CLASSES)

        fleetctl(*DEPLOY)
        show(page, "#/rollouts", "document.querySelector('main')?.innerText.includes('ui-1')")
        page.click("main a[href='#/rollouts/ui-1']")
        page.wait_for("location.hash === '#/rollouts/ui-1' && !!document.querySelector('.stages')")
        page.evaluate("window.stillTheSamePage = true")  # gone if anything reloaded the page
        # the canary stage: its devices update, then it bakes, with the countdown and its gates' values
        page.wait_for("document.querySelector('#bake')?.textContent.includes('Stage 1 baking')", 90)
        canary, rest = stage_text(page).split("Stage 2")
        assert canary.count(" 1/1") == 2 and canary.count("SUCCEEDED 1") == 2, canary  # one device of each class
        assert "not started" in rest, rest
        page.wait_for("document.querySelector('main').innerText.includes('failure_rate')")
        left = page.evaluate("document.querySelector('#bake').textContent")
        assert "s left of 600s" in left, left
        page.screenshot(shots / "rollout.png")

        # the buttons steer it, and the API sees each change
        def steer(action: str, state: str, stage: int) -> None:
            page.click(f"button[data-action={action}]")
            wait_for(lambda: (status := api.get("/v1/rollouts/ui-1").json())["state"] == state
                     and status["stage"] == stage, 30, f"rollout ui-1 {state} at stage {stage + 1} after {action}")
            page.wait_for(f"document.querySelector('h1 .badge')?.textContent === '{state}'")

        steer("pause", "PAUSED", 0)
        assert page.evaluate("document.querySelector('button[data-action=pause]').disabled")
        steer("resume", "RUNNING", 0)
        steer("promote", "RUNNING", 1)
        # the same page follows stage 2 as its devices update (seconds after the click: only polling shows it)
        page.wait_for("document.querySelector('#bake')?.textContent.includes('Stage 2 baking')", 90)
        assert stage_text(page).split("Stage 2")[1].count(" 1/1") == 2, stage_text(page)
        assert page.evaluate("window.stillTheSamePage === true")
        steer("promote", "SUCCEEDED", 1)
        page.wait_for("document.querySelector('.timeline')?.innerText.includes('SUCCEEDED: promote by operator:admin')")
        timeline = page.text(".timeline")
        assert all(f"{action} by operator:admin" in timeline for action in ("pause", "resume", "promote")), timeline
        assert all(f"{device} SUCCEEDED" in timeline for device in DEVICE_IDS), timeline
        assert page.evaluate("[...document.querySelectorAll('button[data-action]')].filter(b => !b.disabled)"
                             ".map(b => b.dataset.action).join()") == "rollback"  # all a finished rollout allows

        device = next(iter(DEVICE_IDS))
        show(page, f"#/devices/{device}", "document.querySelector('main').innerText.includes('SUCCEEDED')")
        # latency over time: a line of at least two reports
        page.wait_for("[...document.querySelectorAll('main svg polyline')].some(line => line.points.length >= 2)", 30)
        page.screenshot(shots / "device.png")

        show(page, "#/models/digits", "document.querySelector('h1')?.textContent === 'digits'"
                                      " && document.querySelectorAll('main svg circle').length >= 2")
        chart = page.text("figcaption")
        assert all(cls in chart for cls in CLASSES), chart
        page.screenshot(shots / "model.png")

        show(page, "#/data", "document.querySelector('main').innerText.includes('samples in')")
        page.screenshot(shots / "data.png")

        show(page, "#/fleet", "document.querySelector('main').innerText.includes('digits 1.0.0')")
        fleet_png = page.screenshot(shots / "fleet.png")

        page.goto(f"{url}/docs")
        page.wait_for("document.querySelector('.swagger-ui .info .title')?.textContent.includes('edgefleet')", 30)

        assert page.errors == [], page.errors
        foreign = [u for u in page.requested if not u.startswith((f"{url}/", "data:", "about:"))]
        assert foreign == [], f"the pages asked for more than the controller serves: {foreign}"

        # a viewer watches the same rollout but is offered no button
        page.goto(f"{url}/ui/")
        page.click("#who button")
        log_in(page, url, viewer)
        page.wait_for("location.hash === '#/fleet' && !!document.querySelector('#fleet-summary')")
        show(page, "#/rollouts/ui-1", "document.querySelector('main').innerText.includes('can watch')")
        assert page.evaluate("document.querySelectorAll('button[data-action]').length") == 0
        assert page.errors == [], page.errors

    width, height = png_size(fleet_png)
    assert width == 1200 and 300 < height <= 2400, (width, height)
