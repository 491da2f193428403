"""The TUF conformance client-under-test CLI, driven as tuf-conformance drives it."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from edgefleet.agent.tufclient import main
from edgefleet.common.protocol import golden_path, target_path
from tests.support.repo_server import Faults
from tests.support.signed_repo import SignedRepo

MODEL = target_path("digits", "1.0.0", "cpu-fp32")
GOLDEN = golden_path("digits", "1.0.0", "cpu-fp32")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SignedRepo]:
    with SignedRepo.create(tmp_path) as repo:
        repo.publish("1.0.0")
        yield repo


def client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefleet.agent.tufclient", *args],
                          capture_output=True, text=True, timeout=60)


def download_args(fleet: SignedRepo, md: Path, targets: Path, *names: str) -> list[str]:
    """Options in the order the conformance suite's client runner passes them."""
    named = [arg for name in names for arg in ("--target-name", name)]
    return ["--metadata-url", fleet.metadata_url, "--metadata-dir", str(md), *named,
            "--target-dir", str(targets), "--target-base-url", fleet.target_base_url, "download"]


def test_init_refresh_download_twice_end_to_end(fleet: SignedRepo, tmp_path: Path) -> None:
    md, targets = tmp_path / "metadata", tmp_path / "targets"
    md.mkdir()
    root = tmp_path / "initial_root.json"
    root.write_bytes(fleet.repository.trusted_root())

    init = client("--metadata-dir", str(md), "init", str(root))
    assert init.returncode == 0, init.stderr
    assert fleet.server.requests == []  # init makes no requests

    refresh = client("--metadata-url", fleet.metadata_url, "--metadata-dir", str(md), "refresh")
    assert refresh.returncode == 0, refresh.stderr
    assert sorted(p.name for p in md.glob("*.json")) == ["root.json", "snapshot.json", "targets.json", "timestamp.json"]

    first = client(*download_args(fleet, md, targets, MODEL, GOLDEN))
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in targets.iterdir()) == sorted([quote(MODEL, ""), quote(GOLDEN, "")])
    assert (targets / quote(MODEL, "")).read_bytes() == fleet.target_file(MODEL).read_bytes()
    fetched = fleet.server.paths("repository/targets/")
    assert [p.rsplit(".", 2)[-2:] for p in fetched] == [["cpu-fp32", "onnx"], ["golden", "npz"]]  # in order

    second = client(*download_args(fleet, md, targets, MODEL, GOLDEN))
    assert second.returncode == 0, second.stderr
    assert fleet.server.paths("repository/targets/") == fetched  # cached: not fetched again


def test_download_of_a_tampered_target_fails_and_stores_nothing(fleet: SignedRepo, tmp_path: Path) -> None:
    md, targets = tmp_path / "metadata", tmp_path / "targets"
    (tmp_path / "root.json").write_bytes(fleet.repository.trusted_root())
    assert main(["--metadata-dir", str(md), "init", str(tmp_path / "root.json")]) == 0
    stored = fleet.target_file(MODEL)
    stored.write_bytes(b"malicious" + stored.read_bytes()[9:])
    result = client(*download_args(fleet, md, targets, MODEL))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "does not match its signed sha256 hash" in result.stderr
    assert list(targets.iterdir()) == []


def test_cut_download_leaves_no_partial_file(fleet: SignedRepo, tmp_path: Path) -> None:
    md, targets = tmp_path / "metadata", tmp_path / "targets"
    (tmp_path / "root.json").write_bytes(fleet.repository.trusted_root())
    assert main(["--metadata-dir", str(md), "init", str(tmp_path / "root.json")]) == 0
    fleet.server.faults = Faults(match=".onnx", cut_after=100)
    assert main(download_args(fleet, md, targets, MODEL)) == 1
    assert list(targets.iterdir()) == []


def test_unknown_target_and_bad_usage_exit_1(fleet: SignedRepo, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    md, targets = tmp_path / "metadata", tmp_path / "targets"
    (tmp_path / "root.json").write_bytes(fleet.repository.trusted_root())
    assert main(["--metadata-dir", str(md), "init", str(tmp_path / "root.json")]) == 0
    assert main(download_args(fleet, md, targets, "nonexistent target")) == 1
    assert "nonexistent target is not signed" in capsys.readouterr().err
    assert main(["--metadata-dir", str(md), "refresh"]) == 1  # no --metadata-url
    assert "refresh needs --metadata-url" in capsys.readouterr().err
    assert main(["--metadata-dir", str(md), "frobnicate"]) == 1
    assert main(["--metadata-dir", str(md), "init", str(tmp_path / "missing.json")]) == 1
