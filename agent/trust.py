"""Which desired states the agent obeys: the director's keys, the device, the generation. No I/O.

The director keys come from the targets metadata the TUF updater verified (and
cached): :meth:`DirectorTrust.from_metadata` checks that metadata against the
trusted root again, as ngclient's trusted set does with its local files, and
verifies each envelope with python-tuf's own delegation check
(``Targets.get_verification_result``) over DSSE's pre-authentication encoding. The
keys are trusted only while the cached timestamp (and root, targets) are unexpired.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from securesystemslib.dsse import Envelope
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from edgefleet.common import director
from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import NAME, DesiredSet

from .errors import CommandRefused, NotSigned, VerificationError


@dataclass(frozen=True)
class Accepted:
    """The newest desired state this device obeyed: its generation and payload digest."""

    generation: int
    digest: str  # sha256 of the signed payload

    @classmethod
    def of(cls, envelope: Envelope, desired: DesiredSet) -> Accepted:
        return cls(desired.generation, hashlib.sha256(envelope.payload).hexdigest())


class DirectorTrust:
    """The director role as the trusted targets metadata delegates it, until ``fresh_until``."""

    def __init__(self, targets: Targets, fresh_until: datetime) -> None:
        if targets.delegations is None or director.ROLE not in (targets.delegations.roles or {}):
            raise VerificationError("trusted targets metadata delegates no director role: run "
                                    "`fleetctl keys rotate director` on the controller")
        self._targets = targets
        # The cached keys are only as current as the cached timestamp: past it, a frozen mirror
        # could keep a revoked director key trusted, so commands wait for fresh metadata.
        self.fresh_until = fresh_until

    @classmethod
    def from_metadata(cls, root: bytes, targets: bytes, timestamp: bytes) -> DirectorTrust:
        """From the updater's cached root.json, targets.json and timestamp.json, each signed by the root's keys."""
        try:
            trusted_root = Metadata[Root].from_bytes(root).signed
            md = Metadata[Targets].from_bytes(targets)
            trusted_root.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
            stamp = Metadata[Timestamp].from_bytes(timestamp)
            trusted_root.verify_delegate(Timestamp.type, stamp.signed_bytes, stamp.signatures)
        except (DeserializationError, UnsignedMetadataError, ValueError) as e:
            raise VerificationError(f"cached TUF metadata unusable for the director role: {e}") from e
        return cls(md.signed, min(trusted_root.expires, md.signed.expires, stamp.signed.expires))

    def fresh_at(self, now: datetime) -> bool:
        return now < self.fresh_until

    @property
    def keyids(self) -> list[str]:
        return list(self._targets.get_delegated_role(director.ROLE).keyids)

    def admit(self, envelope: Envelope, device: str, accepted: Accepted | None) -> DesiredSet:
        """The desired state to act on: newer than ``accepted``, or ``accepted`` itself delivered again.

        Raises NotSigned, or CommandRefused (with the generation when the director signed it for this device).
        """
        result = self._targets.get_verification_result(director.ROLE, envelope.pae(), envelope.signatures)
        if not result:
            raise NotSigned(
                f"not signed by the director (threshold {result.threshold}, "
                f"{len(result.signed)} valid signature(s) of keys {', '.join(k[:8] for k in self.keyids)})"
            )
        try:
            desired = DesiredSet.from_json(envelope.payload)
        except ProtocolError as e:  # signed, so its generation is the director's word, where it names us
            named, generation, deployment = _identity(envelope.payload)
            if named != device:
                generation, deployment = 0, None
            raise CommandRefused(f"{e}", generation, deployment) from None
        if desired.device != device:
            raise CommandRefused(f"signed for device {desired.device!r}, not {device!r}")
        if accepted is not None and desired.generation <= accepted.generation:
            if Accepted.of(envelope, desired) == accepted:
                return desired  # the broker delivers the retained state again after a reconnect
            raise CommandRefused(
                f"generation {desired.generation} is not above {accepted.generation}, the newest accepted",
                desired.generation, desired.deployment,
            )
        return desired


def _identity(payload: bytes) -> tuple[object, int, str | None]:
    """Device, generation and deployment of a signed payload that is not a valid desired state, where readable."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None, 0, None
    if not isinstance(data, dict):
        return None, 0, None
    generation = data.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        generation = 0
    entries = data.get("models")
    changed = [e for e in entries if isinstance(e, dict) and e.get("generation") == generation] \
        if isinstance(entries, list) else []
    deployment = changed[0].get("deployment") if len(changed) == 1 else None
    if not isinstance(deployment, str) or not NAME.match(deployment):
        deployment = None
    return data.get("device"), generation, deployment
