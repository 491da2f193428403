"""The fleet's TUF repository: keys in HOME/keys, metadata and targets in the artifact store.

python-tuf's metadata API does the signing; ``tuf.repository.Repository``
gives the edit/snapshot/timestamp workflow. The store is the only source of
truth: every operation re-reads the metadata chain (timestamp -> snapshot ->
targets) under a lock in HOME, so the API server and ``fleetctl`` can both
publish. Objects are written bottom-up (target files, targets, snapshot,
timestamp; ``N.root.json`` before ``root.json``), so a reader never sees
metadata that names something not yet stored.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.repository import Repository as TufRepository

from edgefleet.common import director
from edgefleet.common.errors import ProtocolError, StorageError
from edgefleet.common.fs import atomic_write
from edgefleet.common.protocol import TargetInfo, golden_path, target_path

from .bundle.report import BundleReport, ReportedVariant
from .config import ControllerConfig
from .errors import Conflict, InvalidInput, NotFound, SigningError
from .store import REPOSITORY_PREFIX, ArtifactStore, open_store

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
METADATA_PREFIX = f"{REPOSITORY_PREFIX}/metadata"
TARGETS_PREFIX = f"{REPOSITORY_PREFIX}/targets"
HASH = "sha256"


@dataclass(frozen=True)
class Expiry:
    """Lifetime of each role's metadata, in seconds."""

    root_s: int = 365 * 86400
    targets_s: int = 365 * 86400
    snapshot_s: int = 7 * 86400
    timestamp_s: int = 86400

    @classmethod
    def from_config(cls, config: ControllerConfig) -> Expiry:
        return cls(snapshot_s=config.snapshot_expiry_s, timestamp_s=config.timestamp_expiry_s)

    def expires(self, role: str) -> datetime:
        seconds = getattr(self, f"{role}_s")
        return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)


@dataclass(frozen=True)
class RoleKey:
    """One key the root lists for a role; ``path`` is None when its private key is not in HOME/keys."""

    role: str
    keyid: str
    threshold: int
    path: str | None


class Keyring:
    """Private ed25519 keys in one directory, found by key id (file names are for people).

    ``*.next.pem`` files are keys of a rotation in progress; they are loaded
    too, so a crash between publishing a new root and renaming its key files
    leaves a repository that can still be signed.
    """

    def __init__(self, directory: Path):
        self.directory = directory

    def load(self) -> dict[str, tuple[Path, CryptoSigner]]:
        if not self.directory.is_dir():
            raise SigningError(f"no signing keys in {self.directory}: run `fleetctl init` first")
        found: dict[str, tuple[Path, CryptoSigner]] = {}
        for path in sorted(self.directory.glob("*.pem")):
            try:
                signer = CryptoSigner(load_pem_private_key(path.read_bytes(), None))
            except (OSError, ValueError, TypeError) as e:
                raise SigningError(f"cannot load signing key {path}: {e}") from e
            found[signer.public_key.keyid] = (path, signer)
        return found

    def create(self, name: str) -> CryptoSigner:
        """Generate a key and write it as NAME.pem, readable by the owner only."""
        signer = CryptoSigner.generate_ed25519()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            atomic_write(self.directory / f"{name}.pem", signer.private_bytes)  # 0600
        except StorageError as e:
            raise SigningError(f"cannot write signing key: {e}") from e
        return signer

    def settle(self, listed: set[str]) -> None:
        """Finish (keys the metadata lists) or discard (keys it does not) a rotation a crash interrupted."""
        for keyid, (path, _) in self.load().items():
            if not path.name.endswith(".next.pem"):
                continue
            if keyid not in listed:
                path.unlink()
                continue
            final = path.with_name(path.name.removesuffix(".next.pem") + ".pem")
            if final.exists():
                self.retire(final)
            os.replace(path, final)

    def retire(self, path: Path) -> None:
        """Move a replaced key out of the signing set (kept for audit under retired/)."""
        retired = self.directory / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        os.replace(path, retired / f"{path.stem}-{datetime.now(UTC):%Y%m%dT%H%M%S}.pem")


def _director(targets: Targets) -> DelegatedRole | None:
    """The delegated director role (its keys sign desired states), if the targets metadata has one."""
    if targets.delegations is None or targets.delegations.roles is None:
        return None
    return targets.delegations.roles.get(director.ROLE)


def _delegate_director(targets: Targets, signers: list[CryptoSigner]) -> None:
    """Make ``signers`` the director role's keys (threshold: all of them); the role signs no targets."""
    old = _director(targets)
    if old is not None:
        for keyid in list(old.keyids):
            targets.revoke_key(keyid, director.ROLE)
    if targets.delegations is None:
        targets.delegations = Delegations(keys={}, roles={})
    assert targets.delegations.roles is not None  # edgefleet never delegates by hash prefix
    # paths=[]: no target path matches it, so clients never look for director metadata
    targets.delegations.roles[director.ROLE] = DelegatedRole(director.ROLE, [], len(signers), True, paths=[])
    for signer in signers:
        targets.add_key(signer.public_key, director.ROLE)


def _listed(md: _Metadata) -> set[str]:
    """Every key id the root and the director delegation list."""
    role = _director(md.targets())
    return {k for spec in md.root().roles.values() for k in spec.keyids} | set(role.keyids if role else [])


def _metadata_key(name: str) -> str:
    return f"{METADATA_PREFIX}/{name}"


def _target_key(target: TargetFile) -> str:
    """Store key of a target under consistent-snapshot naming: DIR/<sha256>.<basename>."""
    return f"{TARGETS_PREFIX}/{target.get_prefixed_paths()[0]}"


class _Metadata(TufRepository):
    """python-tuf's repository workflow over the artifact store and a keyring."""

    def __init__(self, store: ArtifactStore, keyring: Keyring, expiry: Expiry):
        self._store = store
        self._keyring = keyring
        self._expiry = expiry
        self._current: dict[str, Metadata] = {}
        self._signers: dict[str, tuple[Path, CryptoSigner]] | None = None

    @property
    def signers(self) -> dict[str, tuple[Path, CryptoSigner]]:
        if self._signers is None:
            self._signers = self._keyring.load()
        return self._signers

    def add_signer(self, signer: CryptoSigner, path: Path) -> None:
        self.signers[signer.public_key.keyid] = (path, signer)

    # --- tuf.repository.Repository ---------------------------------------

    def open(self, role: str) -> Metadata:
        if role not in self._current:
            self._current[role] = self._load(role)
        return deepcopy(self._current[role])

    def close(self, role: str, md: Metadata) -> None:
        md.signed.version += 1
        md.signed.expires = self._expiry.expires(role)
        self.sign_and_write(md)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {f"{Targets.type}.json": MetaFile(self.open(Targets.type).signed.version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self.open(Snapshot.type).signed.version)

    # --- storage -----------------------------------------------------------

    def _load(self, role: str) -> Metadata:
        if role == Snapshot.type:
            name = f"{self.timestamp().snapshot_meta.version}.snapshot.json"
        elif role == Targets.type:
            name = f"{self.snapshot().meta[f'{Targets.type}.json'].version}.targets.json"
        else:
            name = f"{role}.json"
        try:
            return Metadata.from_bytes(self._store.get_bytes(_metadata_key(name)))
        except NotFound:
            raise SigningError(
                f"{_metadata_key(name)} is missing from the artifact store: run `fleetctl init`"
            ) from None
        except DeserializationError as e:
            raise SigningError(f"{_metadata_key(name)} is not valid TUF metadata: {e}") from e

    def sign_and_write(self, md: Metadata) -> None:
        role = md.signed.type
        md.signatures.clear()
        for signer in self._signers_for(md):
            md.sign(signer, append=True)
        data = md.to_bytes()
        if role == Timestamp.type:
            self._store.put_bytes(_metadata_key("timestamp.json"), data)
        else:
            self._store.put_bytes(_metadata_key(f"{md.signed.version}.{role}.json"), data)
        if role == Root.type:
            self._store.put_bytes(_metadata_key("root.json"), data)
        self._current[role] = md

    def _signers_for(self, md: Metadata) -> list[CryptoSigner]:
        """Signers meeting the role's threshold; a new root also needs the previous root's threshold."""
        role = md.signed.type
        delegators = [md.signed] if role == Root.type else []
        if role != Root.type or Root.type in self._current:
            delegators.append(self.root())
        chosen: dict[str, CryptoSigner] = {}
        for root in delegators:
            spec = root.roles[role]
            have = [keyid for keyid in spec.keyids if keyid in self.signers]
            if len(have) < spec.threshold:
                raise SigningError(
                    f"{role} needs {spec.threshold} signature(s) but only {len(have)} of its keys "
                    f"are in {self._keyring.directory}; add the missing key files"
                )
            chosen.update({keyid: self.signers[keyid][1] for keyid in have})
        return list(chosen.values())


def _resign(md: _Metadata, role: str) -> None:
    """New versions of ``role`` and of what depends on it, signed with the role's current keys."""
    if role == Targets.type:
        with md.edit_targets():
            pass  # a new version signed by the new key
    if role in (Targets.type, Snapshot.type):
        md.do_snapshot(force=True)
    if role != Root.type:
        md.do_timestamp(force=True)


def _release_of(targets: dict[str, TargetFile], model: str, version: str) -> int:
    """The version's existing release, else one above the model's highest."""
    releases = []
    for info in _infos(targets):
        if info.model == model:
            if info.version == version:
                return info.release
            releases.append(info.release)
    return max(releases, default=0) + 1


def _infos(targets: dict[str, TargetFile]) -> list[TargetInfo]:
    found = []
    for target in targets.values():
        if target.custom:
            try:
                found.append(TargetInfo.from_custom(target.custom))
            except ProtocolError:
                continue  # a target not published by edgefleet (no or foreign custom fields)
    return found


class Repository:
    """The fleet's signed model repository (see the module docstring)."""

    def __init__(self, home: Path, store: ArtifactStore, expiry: Expiry | None = None):
        self.home = Path(home)
        self.store = store
        self.keyring = Keyring(self.home / "keys")
        self.expiry = expiry or Expiry()

    @classmethod
    def from_config(cls, config: ControllerConfig) -> Repository:
        return cls(config.home, open_store(config), Expiry.from_config(config))

    @classmethod
    def create(
        cls,
        home: Path,
        store: ArtifactStore,
        root_threshold: int = 1,
        root_keys: int = 1,
        expiry: Expiry | None = None,
    ) -> Repository:
        """New keys and version-1 metadata for every top-level role (consistent snapshots on)."""
        if not 1 <= root_threshold <= root_keys:
            raise InvalidInput(
                f"root threshold {root_threshold} must be between 1 and the number of root keys ({root_keys})"
            )
        repo = cls(home, store, expiry)
        if store.exists(_metadata_key("root.json")) or any(repo.keyring.directory.glob("*.pem")):
            raise Conflict(f"{home} already has a TUF repository; use `fleetctl init --force` to replace it")
        expiry = repo.expiry
        names = ["root"] if root_keys == 1 else [f"root-{i}" for i in range(1, root_keys + 1)]
        root = Root(expires=expiry.expires(Root.type), consistent_snapshot=True)
        with repo._session() as md:
            for name in names:
                root.add_key(repo.keyring.create(name).public_key, Root.type)
            for role in ROLES[1:]:
                root.add_key(repo.keyring.create(role).public_key, role)
            root.roles[Root.type].threshold = root_threshold
            md.sign_and_write(Metadata(root))
            targets = Targets(expires=expiry.expires(Targets.type))
            _delegate_director(targets, [repo.keyring.create(director.ROLE)])
            md.sign_and_write(Metadata(targets))
            snapshot = Snapshot(expires=expiry.expires(Snapshot.type), meta={"targets.json": MetaFile(1)})
            md.sign_and_write(Metadata(snapshot))
            timestamp = Timestamp(expires=expiry.expires(Timestamp.type), snapshot_meta=MetaFile(1))
            md.sign_and_write(Metadata(timestamp))
        return repo

    # --- operations --------------------------------------------------------

    def publish(self, bundle_dir: Path) -> list[TargetInfo]:
        """Sign every variant of a built bundle (model file + golden set) as targets.

        Publishing the same bytes again is a no-op returning the signed infos;
        different bytes under an already published model/version are refused.
        """
        bundle = BundleReport.read(Path(bundle_dir))
        with self._session() as md:
            signed = md.targets().targets
            release = _release_of(signed, bundle.model, bundle.version)
            infos: list[TargetInfo] = []
            new: list[tuple[TargetFile, Path]] = []
            for variant in bundle.variants:
                info, files = self._variant_targets(bundle, variant, release)
                for target, source in files:
                    old = signed.get(target.path)
                    if old is None:
                        new.append((target, source))
                    elif (old.length, old.hashes) != (target.length, target.hashes):
                        raise Conflict(
                            f"{target.path} is already published with different bytes; "
                            f"build and publish under a new --version"
                        )
                    elif old.custom:
                        info = TargetInfo.from_custom(old.custom)  # the first publication stands
                infos.append(info)
            if new:
                for target, source in new:
                    self.store.put_file(_target_key(target), source)
                with md.edit_targets() as targets:
                    for target, _ in new:
                        targets.targets[target.path] = target
                md.do_snapshot()
                md.do_timestamp()
        return infos

    def _variant_targets(
        self, bundle: BundleReport, variant: ReportedVariant, release: int
    ) -> tuple[TargetInfo, list[tuple[TargetFile, Path]]]:
        golden = TargetFile.from_file(
            golden_path(bundle.model, bundle.version, variant.name), str(variant.golden), [HASH]
        )
        try:
            info = TargetInfo.from_dict({
                "model": bundle.model, "version": bundle.version, "variant": variant.name,
                "release": release, "requirements": variant.requirements, "golden": golden.path,
                "golden_sha256": golden.hashes[HASH], "accuracy": variant.accuracy,
                "preference": variant.preference, "p99_ms": variant.p99_ms,
            })
        except ProtocolError as e:
            raise InvalidInput(f"bundle variant {variant.name!r}: {e}") from None
        plain = TargetFile.from_file(
            target_path(bundle.model, bundle.version, variant.name), str(variant.file), [HASH]
        )
        model = TargetFile(plain.length, plain.hashes, plain.path, {"custom": info.to_custom()})
        return info, [(model, variant.file), (golden, variant.golden)]

    def targets(self) -> list[TargetInfo]:
        """Every signed model variant, by model, release and variant."""
        infos = _infos(self._metadata().targets().targets)
        return sorted(infos, key=lambda i: (i.model, i.release, i.variant))

    def target_lengths(self) -> dict[str, int]:
        """Signed length of every target, by target path."""
        return {path: target.length for path, target in self._metadata().targets().targets.items()}

    def resign_if_expiring(self, margin_s: float) -> bool:
        """Re-sign snapshot and timestamp when they expire within ``margin_s``; True if anything was signed."""
        with self._session() as md:
            limit = datetime.now(UTC) + timedelta(seconds=margin_s)
            snapshot_due = md.snapshot().expires <= limit
            if snapshot_due:
                md.do_snapshot(force=True)
            if snapshot_due or md.timestamp().expires <= limit:
                md.do_timestamp(force=True)
                return True
        return False

    def rotate_key(self, role: str) -> list[str]:
        """Replace every key of ``role`` through a new signed root version; returns the new key ids.

        A new root is signed by the old root keys (threshold) and the new ones,
        so clients holding the old root can follow. The role's metadata is then
        re-signed with its new key, and the old key files move to keys/retired/.
        """
        if role == director.ROLE:
            return self._rotate_director()
        if role not in ROLES:
            raise InvalidInput(f"role {role!r} is not one of {', '.join((*ROLES, director.ROLE))}")
        with self._session() as md:
            self.keyring.settle(_listed(md))  # before md loads the keys
            old_ids = list(md.root().roles[role].keyids)
            names = [role] if len(old_ids) == 1 else [f"{role}-{i}" for i in range(1, len(old_ids) + 1)]
            fresh = [(name, self.keyring.create(f"{name}.next")) for name in names]
            old_paths = [md.signers[k][0] for k in old_ids if k in md.signers]
            for name, signer in fresh:
                md.add_signer(signer, self.keyring.directory / f"{name}.next.pem")
            with md.edit_root() as root:
                for _, signer in fresh:
                    root.add_key(signer.public_key, role)
                for keyid in old_ids:
                    root.revoke_key(keyid, role)
            _resign(md, role)
            for path in old_paths:
                self.keyring.retire(path)
            for name, _ in fresh:
                os.replace(self.keyring.directory / f"{name}.next.pem", self.keyring.directory / f"{name}.pem")
        return [signer.public_key.keyid for _, signer in fresh]

    def _rotate_director(self) -> list[str]:
        """A new director key through a new targets version (created when the home has none).

        Devices learn it on their next TUF refresh, which they make when a desired
        state's signature does not verify with the keys they know.
        """
        with self._session() as md:
            self.keyring.settle(_listed(md))
            old = _director(md.targets())
            old_paths = [md.signers[k][0] for k in (old.keyids if old else []) if k in md.signers]
            fresh = self.keyring.create(f"{director.ROLE}.next")
            md.add_signer(fresh, self.keyring.directory / f"{director.ROLE}.next.pem")
            with md.edit_targets() as targets:
                _delegate_director(targets, [fresh])
            md.do_snapshot()
            md.do_timestamp()
            for path in old_paths:
                self.keyring.retire(path)
            os.replace(self.keyring.directory / f"{director.ROLE}.next.pem",
                       self.keyring.directory / f"{director.ROLE}.pem")
        return [fresh.public_key.keyid]

    def director_signers(self) -> list[CryptoSigner]:
        """The director keys the signed targets metadata delegates to, enough for its threshold."""
        md = self._metadata()
        role = _director(md.targets())
        if role is None:
            raise SigningError(f"{self.home} has no director key: run `fleetctl keys rotate director`")
        have = [md.signers[k][1] for k in role.keyids if k in md.signers]
        if len(have) < role.threshold:
            raise SigningError(
                f"director needs {role.threshold} key(s) but {len(have)} are in {self.keyring.directory}; "
                f"add the missing key files or run `fleetctl keys rotate director`"
            )
        return have

    def keys(self) -> list[RoleKey]:
        """The keys the current root (and the director delegation) lists, and where their private halves are."""
        md = self._metadata()
        root = md.root()
        signers = md.signers
        listed = [(role, keyid, root.roles[role].threshold) for role in ROLES for keyid in root.roles[role].keyids]
        delegated = _director(md.targets())
        if delegated is not None:
            listed += [(director.ROLE, keyid, delegated.threshold) for keyid in delegated.keyids]
        return [
            RoleKey(role, keyid, threshold, str(signers[keyid][0]) if keyid in signers else None)
            for role, keyid, threshold in listed
        ]

    def trusted_root(self) -> bytes:
        """The current root metadata, for devices to bootstrap their trust from."""
        try:
            return self.store.get_bytes(_metadata_key("root.json"))
        except NotFound:
            raise SigningError("the repository has no root metadata: run `fleetctl init`") from None

    def root_version(self) -> int:
        return self._metadata().root().version

    # --- helpers -----------------------------------------------------------

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time per fleet home (API server and fleetctl alike)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".repository.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _metadata(self) -> _Metadata:
        """A fresh view of the store: another process or thread may have signed since."""
        return _Metadata(self.store, self.keyring, self.expiry)

    @contextmanager
    def _session(self) -> Iterator[_Metadata]:
        """One writer at a time, working on a fresh view."""
        with self._lock():
            try:
                yield self._metadata()
            except UnsignedMetadataError as e:
                raise SigningError(f"signing failed: {e}") from e
            except ValueError as e:  # python-tuf's repository checks (version rollback, key misuse)
                raise SigningError(f"repository metadata is inconsistent: {e}") from e

