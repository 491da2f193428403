"""The agent's TUF updater against a real signed repository over real HTTP.

Every bad input of the signed-repository section is here: each fails with one
line naming what is wrong, and nothing is staged at the destination.
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import MetaFile

from edgefleet.agent.errors import (
    TransportError,
    UnknownTargetError,
    VerificationError,
)
from edgefleet.agent.fetch import ModelUpdater, check_release, trust_root
from edgefleet.common.errors import EdgefleetError, StorageError
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import target_path
from tests.support.repo_server import Faults
from tests.support.signed_repo import SignedRepo

MODEL = target_path("digits", "1.0.0", "cpu-fp32")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SignedRepo]:
    with SignedRepo.create(tmp_path) as repo:
        repo.publish("1.0.0", size=256 * 1024)
        yield repo


@pytest.fixture
def device(fleet: SignedRepo, tmp_path: Path) -> ModelUpdater:
    updater = fleet.updater(tmp_path / "device/metadata", timeout_s=1.0)
    updater.refresh()
    return updater


def staged(tmp_path: Path) -> list[str]:
    directory = tmp_path / "device/staging"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def fails(error: type[EdgefleetError], match: str, call, *args) -> EdgefleetError:
    with pytest.raises(error, match=match) as raised:
        call(*args)
    assert "\n" not in str(raised.value), str(raised.value)
    return raised.value


def test_refresh_find_and_download(fleet: SignedRepo, device: ModelUpdater, tmp_path: Path) -> None:
    target, info = device.find(MODEL)
    assert (info.model, info.version, info.variant, info.release) == ("digits", "1.0.0", "cpu-fp32", 1)
    dest = device.download(target, tmp_path / "device/staging/model.onnx")
    assert dest.read_bytes() == fleet.target_file(MODEL).read_bytes()
    assert staged(tmp_path) == ["model.onnx"]
    assert device.find_cached(target, dest)
    # consistent snapshots: versioned metadata and hash-prefixed target URLs
    assert any(p.endswith("/2.targets.json") for p in fleet.server.paths("metadata"))
    assert fleet.server.paths("targets/") == [f"repository/targets/digits/1.0.0/{fleet.target_file(MODEL).name}"]


def test_unsigned_target_is_unknown(device: ModelUpdater) -> None:
    fails(UnknownTargetError, "digits/9.9.9/cpu-fp32.onnx is not signed", device.find,
          target_path("digits", "9.9.9", "cpu-fp32"))


def test_flipped_byte_in_target_is_rejected(fleet: SignedRepo, device: ModelUpdater, tmp_path: Path) -> None:
    stored = fleet.target_file(MODEL)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    target, _ = device.find(MODEL)
    fails(VerificationError, "does not match its signed sha256 hash", device.download,
          target, tmp_path / "device/staging/model.onnx")
    assert staged(tmp_path) == []


def test_target_longer_than_signed_length_is_cut_off(fleet: SignedRepo, device: ModelUpdater,
                                                      tmp_path: Path) -> None:
    fleet.server.faults = Faults(match=".onnx", extra=b"\0" * 4096)
    target, _ = device.find(MODEL)
    fails(VerificationError, "longer than its signed length of 262144 bytes", device.download,
          target, tmp_path / "device/staging/model.onnx")
    assert staged(tmp_path) == []


def test_targets_signed_by_an_unknown_key_are_rejected(fleet: SignedRepo, tmp_path: Path) -> None:
    device = fleet.updater(tmp_path / "device/metadata")
    stranger = CryptoSigner.generate_ed25519()
    forged = fleet.forge("2.targets.json", lambda t: t.targets.pop(MODEL), signers=[stranger])
    _point_snapshot_at(fleet, targets_version=forged.signed.version)
    fails(VerificationError, "bad or missing signatures.*targets", device.refresh)


def _point_snapshot_at(fleet: SignedRepo, targets_version: int) -> None:
    """A correctly signed snapshot + timestamp naming targets version ``targets_version``."""
    snapshot_version = fleet.read("timestamp.json").signed.snapshot_meta.version
    snapshot = fleet.forge(f"{snapshot_version}.snapshot.json",
                           lambda s: s.meta.__setitem__("targets.json", MetaFile(targets_version)))
    fleet.forge("timestamp.json", lambda t: setattr(t, "snapshot_meta", MetaFile(snapshot.signed.version)))


def test_replayed_older_timestamp_is_rejected(fleet: SignedRepo, device: ModelUpdater, tmp_path: Path) -> None:
    old = fleet.store.get_bytes("repository/metadata/timestamp.json")
    fleet.publish("1.1.0", seed=1)
    device.refresh()  # the device now trusts the newer timestamp
    fleet.store.put_bytes("repository/metadata/timestamp.json", old)
    fails(VerificationError, "metadata rollback.*timestamp", device.refresh)


def test_replayed_older_snapshot_is_rejected(fleet: SignedRepo, device: ModelUpdater) -> None:
    fleet.publish("1.1.0", seed=1)
    device.refresh()  # trusts snapshot 3
    fleet.forge("timestamp.json", lambda t: setattr(t, "snapshot_meta", MetaFile(2)))
    fails(VerificationError, "metadata rollback.*snapshot", device.refresh)


def test_replayed_older_targets_is_rejected(fleet: SignedRepo, device: ModelUpdater) -> None:
    fleet.publish("1.1.0", seed=1)
    device.refresh()  # trusts targets 3
    _point_snapshot_at(fleet, targets_version=2)
    fails(VerificationError, "metadata rollback.*targets", device.refresh)


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_expired_metadata_is_rejected(fleet: SignedRepo, tmp_path: Path, role: str) -> None:
    device = fleet.updater(tmp_path / "device/metadata")
    past = timedelta(hours=-1)
    if role == "timestamp":
        fleet.forge("timestamp.json", lambda t: None, expires_in=past)
    elif role == "snapshot":
        snapshot = fleet.forge("2.snapshot.json", lambda s: None, expires_in=past)
        fleet.forge("timestamp.json", lambda t: setattr(t, "snapshot_meta", MetaFile(snapshot.signed.version)))
    else:
        targets = fleet.forge("2.targets.json", lambda t: None, expires_in=past)
        _point_snapshot_at(fleet, targets_version=targets.signed.version)
    fails(VerificationError, f"expired metadata.*{role}", device.refresh)


def test_older_release_counter_is_refused(fleet: SignedRepo, device: ModelUpdater) -> None:
    fleet.publish("1.1.0", seed=1)
    device.refresh()
    _, newer = device.find(target_path("digits", "1.1.0", "cpu-fp32"))
    _, older = device.find(MODEL)
    assert (older.release, newer.release) == (1, 2)
    check_release(newer, installed_release=2)  # the same release may be reinstalled
    fails(VerificationError, "release 1, older than installed release 2; refusing to roll back",
          check_release, older, 2)


def test_variant_for_other_hardware_is_detected(fleet: SignedRepo, tmp_path: Path) -> None:
    fleet.publish("2.0.0", seed=2, variants=("cuda-fp16",),
                  requirements={"arch": ["aarch64"], "providers": ["CUDAExecutionProvider"],
                                "cpu_features": [], "min_memory_mb": 4096})
    device = fleet.updater(tmp_path / "device/metadata")
    _, info = device.find(target_path("digits", "2.0.0", "cuda-fp16"))
    pi = HardwareProfile(arch="aarch64", memory_mb=1024, providers=("CPUExecutionProvider",))
    reasons = info.requirements.unmet(pi)
    assert reasons == ["execution provider CUDAExecutionProvider not available",
                       "memory 1024 MB is below 4096 MB"]
    jetson = HardwareProfile(arch="aarch64", memory_mb=8192,
                             providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert info.requirements.unmet(jetson) == []


def test_download_resumes_after_a_mid_stream_cut(fleet: SignedRepo, device: ModelUpdater, tmp_path: Path) -> None:
    target, _ = device.find(MODEL)
    dest = tmp_path / "device/staging/model.onnx"
    fleet.server.faults = Faults(match=".onnx", cut_after=100_000)
    fails(TransportError, "download of digits.*broke off mid-stream", device.download, target, dest)
    assert staged(tmp_path) == ["model.onnx.part"] and not dest.exists()
    assert (tmp_path / "device/staging/model.onnx.part").stat().st_size == 100_000
    fleet.server.faults = Faults()
    device.download(target, dest)
    assert dest.read_bytes() == fleet.target_file(MODEL).read_bytes()
    assert [r.range for r in fleet.server.requests if r.path.endswith(".onnx")] == [None, "bytes=100000-"]
    assert staged(tmp_path) == ["model.onnx"]


def test_download_restarts_cleanly_when_the_server_ignores_range(fleet: SignedRepo, device: ModelUpdater,
                                                                 tmp_path: Path) -> None:
    target, _ = device.find(MODEL)
    dest = tmp_path / "device/staging/model.onnx"
    fleet.server.faults = Faults(match=".onnx", cut_after=50_000)
    with pytest.raises(TransportError):
        device.download(target, dest)
    fleet.server.faults = Faults(match=".onnx", ignore_range=True)
    device.download(target, dest)
    assert dest.read_bytes() == fleet.target_file(MODEL).read_bytes()


def test_stalled_download_times_out_and_keeps_its_progress(fleet: SignedRepo, device: ModelUpdater,
                                                           tmp_path: Path) -> None:
    target, _ = device.find(MODEL)
    fleet.server.faults = Faults(match=".onnx", stall_after=10_000)
    fails(TransportError, "stalled", device.download, target, tmp_path / "device/staging/model.onnx")
    assert staged(tmp_path) == ["model.onnx.part"]


def test_missing_target_file_is_a_transport_error(fleet: SignedRepo, device: ModelUpdater, tmp_path: Path) -> None:
    target, _ = device.find(MODEL)
    fleet.server.faults = Faults(match=".onnx", status=404)
    fails(TransportError, "HTTP 404", device.download, target, tmp_path / "device/staging/model.onnx")
    assert staged(tmp_path) == []


def test_unreachable_repository_is_a_transport_error(fleet: SignedRepo, tmp_path: Path) -> None:
    device = fleet.updater(tmp_path / "device/metadata")
    fleet.server.stop()
    fails(TransportError, "TUF refresh: cannot reach", device.refresh)


def test_refresh_without_a_trusted_root_says_enroll(tmp_path: Path) -> None:
    device = ModelUpdater(tmp_path / "empty", "http://127.0.0.1:9/metadata/", "http://127.0.0.1:9/targets/")
    fails(StorageError, "no trusted root .* enroll the device first", device.refresh)


def test_trust_root_refuses_non_root_metadata(fleet: SignedRepo, tmp_path: Path) -> None:
    timestamp = fleet.store.get_bytes("repository/metadata/timestamp.json")
    fails(VerificationError, "timestamp metadata, not root", trust_root, tmp_path / "md", timestamp)
    fails(VerificationError, "not TUF metadata", trust_root, tmp_path / "md", b"{}")


def test_device_follows_targets_key_rotation_and_rejects_the_old_key(fleet: SignedRepo, device: ModelUpdater,
                                                                     tmp_path: Path) -> None:
    old_key = fleet.signers("targets")
    fleet.repository.rotate_key("targets")
    fleet.publish("1.1.0", seed=1)
    device.refresh()
    device.find(target_path("digits", "1.1.0", "cpu-fp32"))  # signed by the new key: accepted
    snapshot = fleet.read(f"{fleet.read('timestamp.json').signed.snapshot_meta.version}.snapshot.json")
    current = snapshot.signed.meta["targets.json"].version
    forged = fleet.forge(f"{current}.targets.json", lambda t: None, signers=old_key)
    _point_snapshot_at(fleet, targets_version=forged.signed.version)
    fails(VerificationError, "bad or missing signatures.*targets", device.refresh)


def test_device_follows_root_rotation(fleet: SignedRepo, device: ModelUpdater, tmp_path: Path) -> None:
    fleet.repository.rotate_key("root")
    fleet.repository.rotate_key("targets")
    fleet.publish("1.1.0", seed=1)
    device.refresh()
    device.find(target_path("digits", "1.1.0", "cpu-fp32"))
    trusted = (tmp_path / "device/metadata/root.json").read_bytes()
    assert trusted == fleet.repository.trusted_root()  # root v3, reached through v2


def test_device_sees_a_re_signed_timestamp(fleet: SignedRepo, device: ModelUpdater, tmp_path: Path) -> None:
    before = fleet.read("timestamp.json").signed.version
    assert fleet.repository.resign_if_expiring(2 * 86400)
    device.refresh()
    trusted = (tmp_path / "device/metadata/timestamp.json").read_bytes()
    assert trusted == fleet.store.get_bytes("repository/metadata/timestamp.json")
    assert fleet.read("timestamp.json").signed.version == before + 1
