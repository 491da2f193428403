"""A fleet home with a signed TUF repository, served over HTTP, for agent-side tests.

    with SignedRepo.create(tmp_path) as repo:
        repo.publish(version="1.0.0")
        updater = repo.updater(tmp_path / "device-md")
        target, info = updater.find("digits/1.0.0/cpu-fp32.onnx")

Forging helpers re-sign metadata with the fleet's real keys (or with foreign
ones), so tests can play a repository that replays, expires or mis-signs.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edgefleet.agent.fetch import ModelUpdater, trust_root
from edgefleet.common.protocol import TargetInfo
from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.home import init_home
from edgefleet.controller.signing import METADATA_PREFIX, Keyring, Repository
from edgefleet.controller.store.local import LocalStore

from .repo_server import RepoServer, serve

CPU_REQUIREMENTS = {"arch": [], "providers": ["CPUExecutionProvider"], "cpu_features": [], "min_memory_mb": 64}


def make_bundle(
    out: Path,
    model: str = "digits",
    version: str = "1.0.0",
    variants: tuple[str, ...] = ("cpu-fp32",),
    size: int = 4096,
    seed: int = 0,
    requirements: dict | None = None,
) -> Path:
    """Write what `fleetctl bundle build` writes: report.json, <variant>.onnx (random bytes), golden npz."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for preference, variant in enumerate(variants):
        (out / f"{variant}.onnx").write_bytes(b"\x08\x07" + rng.bytes(size - 2))
        np.savez(out / f"{variant}.golden.npz", x=rng.random((2, 4), dtype=np.float32))
        entries.append({
            "variant": variant, "file": f"{variant}.onnx", "golden": f"{variant}.golden.npz",
            "requirements": requirements or CPU_REQUIREMENTS, "preference": preference,
            "size_bytes": size, "op_count": 3, "latency_ms": {"p50": 0.5, "p99": 1.5},
            "accuracy": {"top1": 0.97, "agreement": 1.0, "max_abs_diff": 0.0, "top1_drop": 0.0},
        })
    report = {"model": model, "version": version, "created": "2024-01-01T00:00:00Z",
              "reference": {"top1": 0.97}, "variants": entries, "refused": []}
    (out / "report.json").write_text(json.dumps(report))
    return out


@dataclass
class SignedRepo:
    root: Path
    config: ControllerConfig
    repository: Repository
    server: RepoServer

    @classmethod
    def create(cls, root: Path, **init: Any) -> SignedRepo:
        config = init_home(root / "home", **init)
        repository = Repository.from_config(config)
        return cls(root, config, repository, serve(config.store_path))

    def __enter__(self) -> SignedRepo:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()

    @property
    def store(self) -> LocalStore:
        assert isinstance(self.repository.store, LocalStore)
        return self.repository.store

    @property
    def metadata_url(self) -> str:
        return f"{self.server.url}/repository/metadata/"

    @property
    def target_base_url(self) -> str:
        return f"{self.server.url}/repository/targets/"

    def publish(self, version: str = "1.0.0", **bundle: Any) -> list[TargetInfo]:
        out = make_bundle(self.root / f"bundle-{version}-{bundle.get('seed', 0)}", version=version, **bundle)
        return self.repository.publish(out)

    def updater(self, metadata_dir: Path, timeout_s: float = 5.0) -> ModelUpdater:
        """A device-side updater that trusts the repository's current root."""
        trust_root(metadata_dir, self.repository.trusted_root())
        return ModelUpdater(metadata_dir, self.metadata_url, self.target_base_url, timeout_s)

    def target_file(self, target_path: str) -> Path:
        """Where the store keeps a target's bytes (consistent-snapshot name)."""
        directory, _, name = target_path.rpartition("/")
        matches = list((self.store.root / "repository/targets" / directory).glob(f"*.{name}"))
        assert len(matches) == 1, matches
        return matches[0]

    # --- forging -----------------------------------------------------------

    def read(self, name: str) -> Metadata:
        return Metadata.from_bytes(self.store.get_bytes(f"{METADATA_PREFIX}/{name}"))

    def signers(self, role: str) -> list[CryptoSigner]:
        """The fleet's own keys for ``role`` as the current root lists them."""
        keyids = self.read("root.json").signed.roles[role].keyids
        return [signer for keyid, (_, signer) in Keyring(self.config.home / "keys").load().items() if keyid in keyids]

    def forge(
        self,
        name: str,
        change: Callable[[Any], None],
        signers: list[CryptoSigner] | None = None,
        bump: bool = True,
        expires_in: timedelta = timedelta(days=1),
    ) -> Metadata:
        """Re-sign metadata file ``name`` after ``change(signed)``; written as the next version."""
        md = self.read(name)
        change(md.signed)
        if bump:
            md.signed.version += 1
        md.signed.expires = datetime.now(UTC).replace(microsecond=0) + expires_in
        md.signatures.clear()
        for signer in signers if signers is not None else self.signers(md.signed.type):
            md.sign(signer, append=True)
        role = md.signed.type
        out = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        self.store.put_bytes(f"{METADATA_PREFIX}/{out}", md.to_bytes())
        return md
