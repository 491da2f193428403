"""Forged desired states against a real `fleet-agent run` process on a real broker (issue 11, item 3).

Whoever can publish on a device's desired topic (a compromised broker or device) tries to steer
it. Each case: the agent refuses with one log line and a REJECTED event (under a generation only
when the director signed one for this device), installs nothing, keeps serving, and takes the
next properly signed generation.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner

from edgefleet.agent.slots import model_dir
from edgefleet.common import director
from edgefleet.common.protocol import Action
from tests.support.fleet import Load, ModelRepo, as_set, desired
from tests.test_agent_process import Device

ATTACKER = CryptoSigner.generate_ed25519()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, digits):
    eval_inputs = np.load(digits.eval_data)["input"]
    signed = ModelRepo.create(tmp_path_factory.mktemp("fleet"), eval_inputs, digits.model)
    signed.infos = {v: signed.publish(digits.model, v) for v in ("1.0.0", "2.0.0", "3.0.0")}
    yield signed
    signed.stop()


@pytest.fixture
def device(tmp_path, repo, mosquitto_url):
    d = Device(tmp_path, repo, mosquitto_url).start()
    try:
        assert d.apply(repo.infos["1.0.0"])["state"] == "SUCCEEDED", d.agent.log()
        yield d
    finally:
        d.close()


def tampered(raw: bytes, **changes: object) -> bytes:
    """The director's envelope with its payload changed after signing (signatures kept)."""
    envelope = json.loads(raw)
    payload = {**json.loads(base64.b64decode(envelope["payload"])), **changes}
    return json.dumps({**envelope, "payload": base64.b64encode(json.dumps(payload).encode()).decode()}).encode()


def attack(case: str, device: Device, repo: ModelRepo) -> bytes:
    """The bytes an attacker publishes: each would install 2.0.0 (or roll back) if obeyed."""
    me, two = device.config.device_id, repo.infos["2.0.0"]
    nxt = device.generation + 1
    if case == "unsigned":
        return desired(me, nxt, two).to_json()
    if case == "wrong key":
        return director.seal(as_set(desired(me, nxt, two)), [ATTACKER])
    if case == "another device":
        return repo.seal(desired("dev-someone-else", nxt, two))
    if case == "generation 10**12, attacker key":
        return director.seal(as_set(desired(me, 10**12, two)), [ATTACKER])
    if case == "tampered":
        return tampered(repo.seal(desired(me, nxt, repo.infos["1.0.0"])), version="2.0.0",
                        target="digits/2.0.0/cpu-fp32.onnx")
    raise AssertionError(case)


REFUSALS = {
    "unsigned": "not a signed envelope",
    "wrong key": "not signed by the director",
    "another device": "signed for device 'dev-someone-else'",
    "generation 10**12, attacker key": "not signed by the director",
    "tampered": "not signed by the director",
}


def refused(device: Device, why: str, generation: int = 0) -> dict:
    return device.observer.wait(
        lambda: next((e for e in device.observer.events(generation)
                      if e["state"] == "REJECTED" and why in e["detail"]), None),
        30, f"the refusal ({why})")


def slots(device: Device) -> list[str]:
    return sorted(p.name for p in (model_dir(Path(device.config.state_dir), "digits") / "slots").iterdir())


def unmoved(device: Device, load: Load, version: str, installed: list[str]) -> None:
    """Nothing installed, still serving ``version``, not one request failed."""
    served = load.ok
    device.observer.wait(lambda: load.ok > served + 10, 30, "requests after the refusal")
    assert device.agent.proc is not None and device.agent.proc.poll() is None, device.agent.log()
    assert device.agent.serving_version() == version and load.failures == [], load.failures[:3]
    assert slots(device) == installed


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_forged_desired_state_is_refused_and_the_next_signed_one_taken(case, device, repo):
    installed = slots(device)
    with Load(device.agent) as load:
        device.observer.publish_raw(attack(case, device, repo))
        event = refused(device, REFUSALS[case])
        assert event["deployment"] is None  # nothing the director said is attributed
        unmoved(device, load, "1.0.0", installed)
    assert "refused a desired state: " in device.agent.log()
    done = device.apply(repo.infos["3.0.0"])  # the next generation, properly signed
    assert done["state"] == "SUCCEEDED" and device.agent.serving_version() == "3.0.0", device.agent.log()


def test_a_replayed_older_generation_is_refused(device, repo):
    me = device.config.device_id
    assert device.apply(repo.infos["2.0.0"])["state"] == "SUCCEEDED"
    two = repo.seal(desired(me, device.generation, repo.infos["2.0.0"]))  # what the director sent: 2.0.0
    assert device.apply(action=Action.ROLLBACK)["state"] == "ROLLED_BACK"  # serving 1.0.0 again
    installed = slots(device)
    with Load(device.agent) as load:
        device.observer.publish_raw(two)  # steer it back to 2.0.0 with the director's own words
        event = refused(device, "generation 2 is not above 3", generation=2)
        assert event["deployment"] == "dep-2"  # attributed: the director did sign generation 2
        unmoved(device, load, "1.0.0", installed)
    assert device.apply(repo.infos["3.0.0"])["state"] == "SUCCEEDED"


def test_a_director_key_rotation_the_old_key_refused_the_new_one_taken(device, repo):
    me = device.config.device_id
    old = repo.signed.repository.director_signers()
    repo.signed.repository.rotate_key("director")
    # the agent's cached targets still name the old key: the new one makes it refresh, then obey
    assert device.apply(repo.infos["2.0.0"])["state"] == "SUCCEEDED", device.agent.log()
    installed = slots(device)
    with Load(device.agent) as load:
        device.observer.publish_raw(director.seal(as_set(desired(me, device.generation + 1, repo.infos["3.0.0"])), old))
        assert refused(device, "not signed by the director")["deployment"] is None
        unmoved(device, load, "2.0.0", installed)
    assert device.apply(repo.infos["3.0.0"])["state"] == "SUCCEEDED"


def test_the_floor_survives_a_restart(device, repo):
    me = device.config.device_id
    assert device.apply(repo.infos["2.0.0"])["state"] == "SUCCEEDED"
    older = repo.seal(desired(me, 1, repo.infos["1.0.0"]))
    device.agent.stop()
    device.observer.publish_raw(older)  # waiting for it, retained, when it comes back
    device.agent.start()
    device.agent.wait_live()
    refused(device, "generation 1 is not above 2", generation=1)
    assert device.agent.serving_version() == "2.0.0"
    assert device.apply(repo.infos["3.0.0"])["state"] == "SUCCEEDED"
