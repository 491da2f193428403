"""The agent never dies on a desired state (issue 10): a real `fleet-agent run` process and a
real broker. In each case the agent stays up, keeps serving, reports the failure, and takes
the next good generation."""
import json
import textwrap

import numpy as np
import pytest

from edgefleet.common import director
from edgefleet.common.protocol import Action, Window
from tests.support.fleet import Load, ModelRepo, desired
from tests.test_agent_process import Device


@pytest.fixture(scope="module")
def repo(tmp_path_factory, digits):
    eval_inputs = np.load(digits.eval_data)["input"]
    signed = ModelRepo.create(tmp_path_factory.mktemp("fleet"), eval_inputs, digits.model)
    signed.infos = {v: signed.publish(digits.model, v) for v in ("1.0.0", "2.0.0", "3.0.0")}
    yield signed
    signed.stop()


def publish_signed(device: Device, repo: ModelRepo, entry: dict) -> None:
    """A desired set of one entry, as the director signed it (a controller bug, say), on the
    device's retained desired topic."""
    payload = {"v": 1, "device": entry["device"], "generation": entry["generation"], "models": [entry]}
    device.observer.publish_raw(director.seal_payload(json.dumps(payload).encode(),
                                                      repo.signed.repository.director_signers()))


def still_serving(device: Device, load: Load, version: str) -> None:
    assert device.agent.proc is not None and device.agent.proc.poll() is None, device.agent.log()
    served = load.ok
    device.observer.wait(lambda: load.ok > served + 10, 30, "requests after the refusal")
    assert device.agent.serving_version() == version and load.failures == [], load.failures[:3]


def take_next_good(device: Device, info, **fields) -> None:
    done = device.apply(info, **fields)
    assert done["state"] == "SUCCEEDED", (done, device.agent.log())
    assert device.agent.serving_version() == info.version


@pytest.fixture
def device(tmp_path, repo, mosquitto_url):
    d = Device(tmp_path, repo, mosquitto_url).start()
    try:
        assert d.apply(repo.infos["1.0.0"])["state"] == "SUCCEEDED", d.agent.log()
        yield d
    finally:
        d.close()


def test_a_malformed_window_is_rejected_and_the_agent_stays_up(device, repo):
    with Load(device.agent) as load:
        device.generation += 1
        bad = desired(device.config.device_id, device.generation, repo.infos["2.0.0"],
                      window=Window(cron="61 25 * * *", duration_s=7200))  # built, never validated
        publish_signed(device, repo, bad.to_dict())
        refused = device.observer.wait_terminal(device.generation)
        assert refused["state"] == "REJECTED" and refused["deployment"] == f"dep-{device.generation}"
        assert "Window.cron '61 25 * * *': minute 61 is out of range 0-59" in refused["detail"]
        still_serving(device, load, "1.0.0")
    # the next good generation, with a window in day names the agent understands (open all week)
    take_next_good(device, repo.infos["2.0.0"], window=Window(cron="* * * JAN-DEC sun-SAT", duration_s=60))


def test_a_desired_state_it_cannot_parse_is_rejected_and_the_agent_stays_up(device, repo):
    with Load(device.agent) as load:
        device.generation += 1
        wrong_types = {**desired(device.config.device_id, device.generation, repo.infos["2.0.0"]).to_dict(),
                       "model": 7, "gate": "fast"}
        publish_signed(device, repo, wrong_types)
        refused = device.observer.wait_terminal(device.generation)
        assert refused["state"] == "REJECTED" and refused["deployment"] == f"dep-{device.generation}"
        assert refused["detail"].startswith("desired state refused: DesiredSet.models[0]: Desired.")
        device.observer.publish_raw(b"\x00 not json {")
        garbage = device.observer.wait(
            lambda: next((e for e in device.observer.events(0) if "not valid JSON" in e["detail"]), None),
            30, "the garbage refused")
        assert garbage["state"] == "REJECTED"
        still_serving(device, load, "1.0.0")
    take_next_good(device, repo.infos["2.0.0"])


# Loaded by the agent process at start (PYTHONPATH): a handler that raises on version 2.0.0,
# and a pass that raises once outside any handler when generation 4 arrives.
FAULTS = '''
from edgefleet.agent import reconcile

verify, execution = reconcile.Reconciler._verify, reconcile.Reconciler._execution
raised = set()

def faulty_verify(self, journal):
    if journal.desired.version == "2.0.0":
        raise RuntimeError("injected bug in verify")
    return verify(self, journal)

def faulty_execution(self, desired):
    if desired is not None and desired.generation == 4 and 4 not in raised:
        raised.add(4)
        raise RuntimeError("injected bug in the pass")
    return execution(self, desired)

reconcile.Reconciler._verify, reconcile.Reconciler._execution = faulty_verify, faulty_execution
'''


def test_a_handler_or_pass_raising_unexpectedly_keeps_the_agent_up(tmp_path, repo, mosquitto_url):
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(textwrap.dedent(FAULTS))
    device = Device(tmp_path, repo, mosquitto_url, env={"PYTHONPATH": str(faults)}).start()
    try:
        assert device.apply(repo.infos["1.0.0"])["state"] == "SUCCEEDED", device.agent.log()
        with Load(device.agent) as load:
            failed = device.apply(repo.infos["2.0.0"])
            assert failed["state"] == "FAILED", failed
            assert failed["detail"] == "verify failed unexpectedly: RuntimeError: injected bug in verify"
            still_serving(device, load, "1.0.0")
        take_next_good(device, repo.infos["3.0.0"])   # generation 3
        # generation 4: the pass itself raises once; the main loop backs off and tries again
        done = device.apply(action=Action.ROLLBACK, timeout=90)
        assert done["state"] == "ROLLED_BACK", (done, device.agent.log())
        assert "agent main loop failed; still serving" in device.agent.log()
        assert device.agent.proc is not None and device.agent.proc.poll() is None
        assert device.agent.serving_version() == "1.0.0"
    finally:
        device.close()
