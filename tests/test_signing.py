"""The controller's TUF repository: init, publish, re-sign, rotate; `fleetctl keys`."""
from __future__ import annotations

import json
import stat
import tomllib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from edgefleet.common.protocol import TargetInfo
from edgefleet.controller.cli import main as fleetctl
from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.errors import Conflict, InvalidInput, SigningError
from edgefleet.controller.home import init_home
from edgefleet.controller.signing import Expiry, Keyring, Repository
from tests.support.signed_repo import make_bundle


@pytest.fixture
def home(tmp_path: Path) -> Path:
    init_home(tmp_path / "home")
    return tmp_path / "home"


@pytest.fixture
def repo(home: Path) -> Repository:
    return Repository.from_config(ControllerConfig.load(home))


def _metadata(repo: Repository, name: str) -> Metadata:
    return Metadata.from_bytes(repo.store.get_bytes(f"repository/metadata/{name}"))


def _versions(repo: Repository) -> dict[str, int]:
    timestamp = _metadata(repo, "timestamp.json").signed
    snapshot = _metadata(repo, f"{timestamp.snapshot_meta.version}.snapshot.json").signed
    return {"root": _metadata(repo, "root.json").signed.version, "timestamp": timestamp.version,
            "snapshot": snapshot.version, "targets": snapshot.meta["targets.json"].version}


def test_init_creates_home_keys_and_initial_metadata(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = init_home(home, root_threshold=2, root_keys=3)
    assert config.home == home
    assert tomllib.loads((home / "config.toml").read_text()) == {}  # only commented defaults
    assert "# api_port = 8470" in (home / "config.toml").read_text()
    keys = sorted(p.name for p in (home / "keys").glob("*.pem"))
    assert keys == ["director.pem", "root-1.pem", "root-2.pem", "root-3.pem", "snapshot.pem", "targets.pem",
                    "timestamp.pem"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (home / "keys").glob("*.pem"))
    metadata = home / "store/repository/metadata"
    assert sorted(p.name for p in metadata.iterdir()) == [
        "1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"]
    root = Metadata[Root].from_file(str(metadata / "root.json"))
    assert root.signed.consistent_snapshot is True
    assert root.signed.roles["root"].threshold == 2 and len(root.signed.roles["root"].keyids) == 3
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)  # self-signed by >= 2 keys
    # the director role: signs desired states, never a target
    targets = Metadata[Targets].from_file(str(metadata / "1.targets.json")).signed
    assert targets.delegations is not None and targets.delegations.roles is not None
    delegated = targets.delegations.roles["director"]
    assert delegated.paths == [] and delegated.threshold == 1
    assert targets.get_key(delegated.keyids[0]).keyid in {
        signer.public_key.keyid for _, signer in Keyring(home / "keys").load().values()}


def test_init_refuses_existing_home_unless_forced(home: Path) -> None:
    before = (home / "store/repository/metadata/root.json").read_bytes()
    with pytest.raises(Conflict, match="--force") as refused:
        init_home(home)
    assert "\n" not in str(refused.value)
    assert (home / "store/repository/metadata/root.json").read_bytes() == before
    init_home(home, force=True)
    assert (home / "store/repository/metadata/root.json").read_bytes() != before
    assert (home / "config.toml.bak").exists()


def test_init_rejects_threshold_above_key_count(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="threshold 3"):
        init_home(tmp_path / "home", root_threshold=3, root_keys=2)


def test_publish_signs_model_and_golden_targets_with_release_counter(repo: Repository, tmp_path: Path) -> None:
    first = repo.publish(make_bundle(tmp_path / "a", version="1.0.0", variants=("cpu-fp32", "cpu-int8")))
    assert [(i.variant, i.release) for i in first] == [("cpu-fp32", 1), ("cpu-int8", 1)]
    second = repo.publish(make_bundle(tmp_path / "b", version="1.1.0", seed=1))
    assert [(i.version, i.release) for i in second] == [("1.1.0", 2)]
    other = repo.publish(make_bundle(tmp_path / "c", model="resnet50", version="0.1.0", seed=2))
    assert other[0].release == 1  # the counter is per model

    targets = _metadata(repo, f"{_versions(repo)['targets']}.targets.json").signed.targets
    model = targets["digits/1.0.0/cpu-fp32.onnx"]
    golden = targets["digits/1.0.0/cpu-fp32.golden.npz"]
    info = TargetInfo.from_custom(model.custom)
    assert info == first[0]
    assert info.golden == golden.path and info.golden_sha256 == golden.hashes["sha256"]
    assert info.requirements.min_memory_mb == 64 and info.p99_ms == 1.5 and info.accuracy["top1"] == 0.97
    stored = repo.store.get_bytes(f"repository/targets/digits/1.0.0/{model.hashes['sha256']}.cpu-fp32.onnx")
    assert stored == (tmp_path / "a/cpu-fp32.onnx").read_bytes()
    assert [(i.model, i.version, i.variant) for i in repo.targets()] == [
        ("digits", "1.0.0", "cpu-fp32"), ("digits", "1.0.0", "cpu-int8"), ("digits", "1.1.0", "cpu-fp32"),
        ("resnet50", "0.1.0", "cpu-fp32")]


def test_republishing_same_bytes_is_a_no_op(repo: Repository, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "a")
    first = repo.publish(bundle)
    versions = _versions(repo)
    assert repo.publish(bundle) == first
    assert _versions(repo) == versions


def test_republishing_a_version_with_different_bytes_is_refused(repo: Repository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "a", seed=0))
    versions = _versions(repo)
    with pytest.raises(Conflict, match=r"different bytes.*new --version") as refused:
        repo.publish(make_bundle(tmp_path / "b", seed=1))
    assert "\n" not in str(refused.value)
    assert _versions(repo) == versions
    assert len(repo.store.list("repository/targets")) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "report.json").unlink(), "report.json not found"),
    (lambda out: (out / "report.json").write_text("{"), "not a valid bundle report"),
    (lambda out: (out / "cpu-fp32.golden.npz").unlink(), "golden .* is missing"),
    (lambda out: _edit_report(out, file="../escape.onnx"), "plain file name"),
    (lambda out: _edit_report(out, variant="bad/name"), "TargetInfo.variant"),
])
def test_publish_rejects_bad_bundles_with_one_line(repo: Repository, tmp_path: Path, damage, message) -> None:
    out = make_bundle(tmp_path / "out")
    damage(out)
    with pytest.raises(InvalidInput, match=message) as refused:
        repo.publish(out)
    assert "\n" not in str(refused.value)
    assert repo.targets() == [] and _versions(repo)["targets"] == 1


def _edit_report(out: Path, **fields: str) -> None:
    report = json.loads((out / "report.json").read_text())
    report["variants"][0].update(fields)
    (out / "report.json").write_text(json.dumps(report))


def test_resign_if_expiring_renews_timestamp_and_snapshot(home: Path) -> None:
    repo = Repository(home, Repository.from_config(ControllerConfig.load(home)).store,
                      Expiry(snapshot_s=3 * 3600, timestamp_s=3600))
    before = _versions(repo)
    assert repo.resign_if_expiring(60) is False  # init's timestamp lives a day
    assert repo.resign_if_expiring(8 * 86400) is True  # both within the margin: both re-signed
    after = _versions(repo)
    assert after["timestamp"] == before["timestamp"] + 1 and after["snapshot"] == before["snapshot"] + 1
    expires = _metadata(repo, "timestamp.json").signed.expires
    assert expires - datetime.now(UTC) < timedelta(hours=1, minutes=1)
    assert repo.resign_if_expiring(2 * 3600) is True  # timestamp (1 h) due, snapshot (3 h) not
    assert _versions(repo)["snapshot"] == after["snapshot"]
    assert _versions(repo)["timestamp"] == after["timestamp"] + 1


def test_rotate_targets_key_through_signed_root_update(repo: Repository, home: Path, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "a"))
    old_root = _metadata(repo, "root.json")
    old_key = old_root.signed.roles["targets"].keyids[0]
    before = _versions(repo)
    [new_key] = repo.rotate_key("targets")
    new_root = _metadata(repo, "2.root.json")
    assert new_root.signed.roles["targets"].keyids == [new_key] != [old_key]
    old_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
    targets = _metadata(repo, f"{_versions(repo)['targets']}.targets.json")
    assert _versions(repo)["targets"] == before["targets"] + 1
    new_root.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    assert len(repo.targets()) == 1  # the published targets stay signed
    assert sorted(p.name for p in (home / "keys").glob("targets*.pem")) == ["targets.pem"]
    assert len(list((home / "keys/retired").glob("targets-*.pem"))) == 1
    assert [k.keyid for k in repo.keys() if k.role == "targets"] == [new_key]


def test_rotate_root_key_is_signed_by_old_and_new_root_keys(tmp_path: Path) -> None:
    init_home(tmp_path / "home", root_threshold=2, root_keys=2)
    repo = Repository.from_config(ControllerConfig.load(tmp_path / "home"))
    old_root = _metadata(repo, "root.json")
    new_keys = repo.rotate_key("root")
    new_root = _metadata(repo, "2.root.json")
    assert set(new_root.signed.roles["root"].keyids) == set(new_keys)
    assert not set(new_keys) & set(old_root.signed.roles["root"].keyids)
    assert len(new_root.signatures) == 4
    old_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
    new_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
    assert repo.trusted_root() == new_root.to_bytes()
    repo.rotate_key("root")  # the renamed key files sign the next rotation
    third = _metadata(repo, "3.root.json")
    new_root.signed.verify_delegate("root", third.signed_bytes, third.signatures)


def test_signing_without_the_role_key_fails_with_one_line(repo: Repository, home: Path, tmp_path: Path) -> None:
    (home / "keys/targets.pem").unlink()
    with pytest.raises(SigningError, match="targets needs 1 signature") as refused:
        repo.publish(make_bundle(tmp_path / "a"))
    assert "\n" not in str(refused.value)


def test_rotate_unknown_role_is_refused(repo: Repository) -> None:
    with pytest.raises(InvalidInput, match="not one of root, targets, snapshot, timestamp"):
        repo.rotate_key("mirror")


def test_fleetctl_keys_list_and_rotate(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(home))
    runner = CliRunner()
    listed = runner.invoke(fleetctl, ["keys", "list", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert sorted(r["role"] for r in rows) == ["director", "root", "snapshot", "targets", "timestamp"]
    rotated = runner.invoke(fleetctl, ["keys", "rotate", "timestamp"])
    assert rotated.exit_code == 0, rotated.output
    assert "root version 2" in rotated.output
    relisted = json.loads(runner.invoke(fleetctl, ["keys", "list", "--format", "json"]).output)
    old = {r["keyid"] for r in rows if r["role"] == "timestamp"}
    assert {r["keyid"] for r in relisted if r["role"] == "timestamp"}.isdisjoint(old)
    table = runner.invoke(fleetctl, ["keys", "list"])
    assert table.exit_code == 0 and "ROLE" in table.output


def test_fleetctl_keys_without_home_says_run_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "nowhere"))
    result = CliRunner().invoke(fleetctl, ["keys", "list"])
    assert result.exit_code == 1
    assert "fleetctl init" in result.output and len(result.output.strip().splitlines()) == 1


def test_signed_metadata_rejects_tampering(repo: Repository, tmp_path: Path) -> None:
    """Sanity check that what publish writes is really signed (not just well-formed)."""
    repo.publish(make_bundle(tmp_path / "a"))
    root = _metadata(repo, "root.json").signed
    targets = _metadata(repo, "2.targets.json")
    targets.signed.targets["digits/1.0.0/cpu-fp32.onnx"].length += 1
    with pytest.raises(UnsignedMetadataError):
        root.verify_delegate("targets", targets.signed_bytes, targets.signatures)


def test_concurrent_publishes_are_serialized(repo: Repository, home: Path, tmp_path: Path) -> None:
    bundles = [make_bundle(tmp_path / f"b{i}", version=f"1.{i}.0", seed=i) for i in range(4)]
    other = Repository.from_config(ControllerConfig.load(home))  # as a second process would
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda ib: (repo, other)[ib[0] % 2].publish(ib[1]), enumerate(bundles)))
    assert sorted(r[0].release for r in results) == [1, 2, 3, 4]
    assert sorted(i.version for i in repo.targets()) == ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]
    assert _versions(repo)["targets"] == 5


def test_rotation_settles_an_interrupted_earlier_rotation(repo: Repository, home: Path) -> None:
    keys = home / "keys"
    [current] = repo.rotate_key("targets")
    # as if the process died after publishing root v2 but before renaming the key files:
    (keys / "targets.pem").rename(keys / "targets.next.pem")
    next(iter((keys / "retired").glob("targets-*.pem"))).rename(keys / "targets.pem")
    repo.keyring.create("snapshot.next")  # and an aborted rotation that never reached a root
    repo.rotate_key("timestamp")
    assert [k.path for k in repo.keys() if k.role == "targets"] == [str(keys / "targets.pem")]
    assert [k.keyid for k in repo.keys() if k.role == "targets"] == [current]
    assert sorted(p.name for p in keys.glob("*.pem")) == ["director.pem", "root.pem", "snapshot.pem", "targets.pem",
                                                         "timestamp.pem"]
