"""The director role: the controller's keys and seal, the agent's trust class (no I/O) and its
Director over a real TUF cache refreshed from a served repository."""
from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import CliRunner
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Targets

from edgefleet.agent.director import Director, RefreshLater
from edgefleet.agent.errors import CommandRefused, NotSigned, TransportError, VerificationError
from edgefleet.agent.fetch import ModelUpdater
from edgefleet.agent.trust import Accepted, DirectorTrust
from edgefleet.common import director
from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import Action, Desired, DesiredSet
from edgefleet.controller.cli import main as fleetctl
from edgefleet.controller.director import DirectorSigner
from edgefleet.controller.errors import SigningError
from edgefleet.controller.signing import Repository
from tests.support.signed_repo import SignedRepo

DEVICE = "dev-1"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SignedRepo]:
    with SignedRepo.create(tmp_path) as repo:
        yield repo


@pytest.fixture
def signer(fleet: SignedRepo) -> DirectorSigner:
    return DirectorSigner(fleet.repository)


def command(generation: int, device: str = DEVICE, action: Action = Action.NONE) -> DesiredSet:
    entry = Desired(device=device, generation=generation, action=action, deployment=f"r{generation}", model="digits")
    return DesiredSet(device=device, generation=generation, models=(entry,))


def trust_of(fleet: SignedRepo) -> DirectorTrust:
    version = fleet.read("timestamp.json").signed.snapshot_meta.version
    targets = fleet.read(f"{version}.snapshot.json").signed.meta["targets.json"].version
    return DirectorTrust.from_metadata(fleet.read("root.json").to_bytes(), fleet.read(f"{targets}.targets.json").to_bytes(),
                                       fleet.read("timestamp.json").to_bytes())


def admit(trust: DirectorTrust, raw: bytes, accepted: object = None) -> DesiredSet:
    return trust.admit(director.open_envelope(raw), DEVICE, accepted)  # type: ignore[arg-type]


def test_a_sealed_command_is_admitted_and_republished_byte_identical(fleet, signer):
    raw = signer.seal(command(3))
    assert signer.seal(command(3)) == raw  # ed25519 is deterministic: the outbox may republish
    assert admit(trust_of(fleet), raw) == command(3)


@pytest.mark.parametrize("forge, refusal", [
    ("unsigned", "not a signed envelope"),
    ("wrong key", "not signed by the director"),
    ("tampered", "not signed by the director"),
    ("no signature", "1 to 8 signatures"),
])
def test_forged_commands_are_not_signed(fleet, signer, forge, refusal):
    good = json.loads(signer.seal(command(4)))
    if forge == "unsigned":
        raw = command(4).to_json()
    elif forge == "wrong key":
        raw = director.seal(command(4), [CryptoSigner.generate_ed25519()])
    elif forge == "tampered":  # the director's signature, over a payload changed after signing
        payload = json.loads(base64.b64decode(good["payload"]))
        raw = json.dumps({**good, "payload": base64.b64encode(
            json.dumps({**payload, "action": "rollback"}).encode()).decode()}).encode()
    else:
        raw = json.dumps({**good, "signatures": []}).encode()
    with pytest.raises(NotSigned if forge in ("wrong key", "tampered") else ProtocolError, match=refusal) as refused:
        admit(trust_of(fleet), raw)
    assert "\n" not in str(refused.value)


def test_another_devices_command_older_generations_and_attacker_generations(fleet, signer):
    trust = trust_of(fleet)
    with pytest.raises(CommandRefused, match="signed for device 'dev-2'") as other:
        admit(trust, signer.seal(command(5, device="dev-2")))
    assert other.value.generation == 0  # not this device's: nothing to attribute
    current = signer.seal(command(5))
    accepted = Accepted.of(director.open_envelope(current), command(5))
    assert admit(trust, current, accepted) == command(5)  # the retained state, delivered again
    with pytest.raises(CommandRefused, match="generation 4 is not above 5") as replay:
        admit(trust, signer.seal(command(4)), accepted)
    assert (replay.value.generation, replay.value.deployment) == (4, "r4")
    with pytest.raises(CommandRefused, match="generation 5 is not above 5"):  # same generation, other content
        admit(trust, signer.seal(command(5, action=Action.ROLLBACK)), accepted)
    with pytest.raises(NotSigned):
        admit(trust, director.seal(command(10**12), [CryptoSigner.generate_ed25519()]), accepted)
    assert admit(trust, signer.seal(command(6)), accepted) == command(6)


def test_targets_not_signed_by_the_root_give_no_trust(fleet):
    version = fleet.read("timestamp.json").signed.snapshot_meta.version
    name = f"{fleet.read(f'{version}.snapshot.json').signed.meta['targets.json'].version}.targets.json"
    forged = fleet.read(name)
    forged.signatures.clear()
    forged.sign(CryptoSigner.generate_ed25519())
    with pytest.raises(VerificationError, match="cached TUF metadata unusable"):
        DirectorTrust.from_metadata(fleet.read("root.json").to_bytes(), forged.to_bytes(),
                                    fleet.read("timestamp.json").to_bytes())
    bare = Metadata(Targets())
    for key in fleet.signers("targets"):
        bare.sign(key, append=True)
    with pytest.raises(VerificationError, match="delegates no director role"):
        DirectorTrust.from_metadata(fleet.read("root.json").to_bytes(), bare.to_bytes(),
                                    fleet.read("timestamp.json").to_bytes())


def test_director_key_rotation_old_key_refused_new_key_accepted(fleet, signer):
    old = fleet.repository.director_signers()
    (new_id,) = fleet.repository.rotate_key("director")
    assert [s.public_key.keyid for s in fleet.repository.director_signers()] == [new_id]
    assert [k.keyid for k in fleet.repository.keys() if k.role == "director"] == [new_id]
    trust = trust_of(fleet)
    assert trust.keyids == [new_id]
    with pytest.raises(NotSigned):
        admit(trust, director.seal(command(7), old))
    assert admit(trust, signer.seal(command(7))) == command(7)  # the signer follows HOME/keys


def test_a_home_without_a_director_gets_one_by_rotation(fleet, monkeypatch):
    with fleet.repository._session() as md:  # a home made before desired states were signed
        with md.edit_targets() as targets:
            targets.delegations = None
        md.do_snapshot()
        md.do_timestamp()
    with pytest.raises(SigningError, match="run `fleetctl keys rotate director`"):
        DirectorSigner(fleet.repository)
    monkeypatch.setenv("EDGEFLEET_HOME", str(fleet.config.home))
    rotated = CliRunner().invoke(fleetctl, ["keys", "rotate", "director"])
    assert rotated.exit_code == 0 and "rotated director" in rotated.output, rotated.output
    (keyid,) = [k.keyid for k in fleet.repository.keys() if k.role == "director"]
    assert list(director.open_envelope(DirectorSigner(fleet.repository).seal(command(1))).signatures) == [keyid]


class Refreshes(ModelUpdater):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.count = 0

    def refresh(self) -> None:
        self.count += 1
        super().refresh()


U = TypeVar("U", bound=ModelUpdater)


def first_boot(fleet: SignedRepo, state: Path, updater: type[U]) -> U:
    """``updater`` over a device state that trusts the root and has no targets metadata yet."""
    fleet.updater(state / "tuf")
    return updater(state / "tuf", fleet.metadata_url, fleet.target_base_url, 5.0)


def test_director_refreshes_first_persists_the_floor_and_refreshes_once_per_rotation(fleet, signer, tmp_path):
    state = tmp_path / "state"
    updater = first_boot(fleet, state, Refreshes)
    clock = [100.0]
    d = Director(state, DEVICE, updater, clock=lambda: clock[0])
    assert d.admit(signer.seal(command(2)), received=clock[0]) == command(2)
    assert updater.count == 1  # first boot: refreshed before judging
    restarted = Director(state, DEVICE, updater, clock=lambda: clock[0])
    with pytest.raises(CommandRefused, match="generation 1 is not above 2"):
        restarted.admit(signer.seal(command(1)), received=clock[0])
    assert restarted.admit(signer.seal(command(2)), received=clock[0]) == command(2)  # the redelivery
    with pytest.raises(NotSigned):  # an attacker's key: one refresh, then refused for good
        restarted.admit(director.seal(command(3), [CryptoSigner.generate_ed25519()]), received=clock[0])
    assert updater.count == 2
    fleet.repository.rotate_key("director")
    clock[0] += 1  # within REFRESH_MIN_S of the last refresh: judged again later
    with pytest.raises(RefreshLater):
        restarted.admit(signer.seal(command(3)), received=clock[0])
    clock[0] += 10
    assert restarted.admit(signer.seal(command(3)), received=clock[0] - 10) == command(3)
    assert updater.count == 3


class Unreachable:
    """A mirror that is gone (or held back by an attacker): every refresh fails in transport."""

    def refresh(self) -> None:
        raise TransportError("TUF refresh: connection refused")


def test_past_the_cached_timestamp_nothing_is_obeyed_until_fresh_metadata_arrives(fleet, signer, tmp_path):
    """A frozen mirror must not keep a rotated-out (compromised) director key trusted: the cached
    keys hold only until the cached timestamp expires (a day by default)."""
    state = tmp_path / "state"
    fleet.updater(state / "tuf").refresh()
    compromised = fleet.repository.director_signers()
    expiry = trust_of(fleet).fresh_until  # what the device cached, before the rotation re-signs it
    fleet.repository.rotate_key("director")  # the device is cut off before it learns of the rotation
    clock, later = [100.0], [expiry - timedelta(seconds=1)]
    cut_off = Director(state, DEVICE, Unreachable(), clock=lambda: clock[0], now=lambda: later[0])
    assert cut_off.admit(director.seal(command(2), compromised), received=clock[0]) == command(2)  # the TUF window
    later[0] = expiry
    with pytest.raises(TransportError):  # expired: refresh first, and the mirror is unreachable
        cut_off.admit(director.seal(command(3), compromised), received=clock[0])
    updater = Refreshes(state / "tuf", fleet.metadata_url, fleet.target_base_url, 5.0)
    d = Director(state, DEVICE, updater, clock=lambda: clock[0], now=lambda: later[0])
    later[0] = expiry + timedelta(days=2)  # the repository's own timestamp is stale too
    with pytest.raises(RefreshLater, match="expired"):
        d.admit(signer.seal(command(3)), received=clock[0])
    assert updater.count == 1
    longer = Repository.from_config(replace(fleet.config, timestamp_expiry_s=30 * 86400, snapshot_expiry_s=30 * 86400))
    assert longer.resign_if_expiring(10 * 86400)  # the controller's expiry job signs fresh metadata
    clock[0] += 10
    with pytest.raises(NotSigned):  # fresh metadata: the rotated-out key is refused for good
        d.admit(director.seal(command(3), compromised), received=clock[0])
    assert d.admit(signer.seal(command(3)), received=clock[0]) == command(3)
    assert updater.count == 2


class FailsOnce(Refreshes):
    """The repository is unreachable for the first refresh, as when a fleet starts all at once."""

    def refresh(self) -> None:
        self.count += 1
        if self.count == 1:
            raise TransportError("TUF refresh: connection refused")
        ModelUpdater.refresh(self)


def test_a_refresh_that_failed_in_transport_does_not_refuse_the_command(fleet, signer, tmp_path):
    state = tmp_path / "state"
    updater = first_boot(fleet, state, FailsOnce)
    clock = [100.0]
    d = Director(state, DEVICE, updater, clock=lambda: clock[0])
    raw = signer.seal(command(1))
    with pytest.raises(TransportError):
        d.admit(raw, received=clock[0])
    clock[0] += 15  # judged again later: the refresh works now, and the command is obeyed
    assert d.admit(raw, received=100.0) == command(1)
    assert updater.count == 2
