"""Signed desired states: the wire form of a director's command (Uptane's director role, on TUF keys).

A desired state travels as a DSSE envelope (securesystemslib's ``dsse.Envelope``)::

    {"payload": base64(DesiredSet.to_json()), "payloadType": PAYLOAD_TYPE,
     "signatures": [{"keyid": ..., "sig": base64}]}

The signature covers the exact payload bytes (DSSE's pre-authentication encoding),
so no canonical JSON is needed: a desired state carries floats (sampling rate, gate
bounds), which TUF's canonical JSON cannot encode. The signing keys are those the
fleet's targets metadata delegates to the role :data:`ROLE` (no target paths), so the
agent learns them through its TUF root chain. ed25519 signs deterministically: a
republished desired state is byte-identical.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from securesystemslib.dsse import Envelope
from securesystemslib.signer import Signature, Signer

from . import jsonlimit
from .errors import ProtocolError
from .protocol import MAX_MESSAGE_BYTES, DesiredSet

ROLE = "director"  # the delegated role whose keys sign desired states
PAYLOAD_TYPE = "application/vnd.edgefleet.desired+json"
MAX_SIGNATURES = 8  # more than any threshold a fleet uses; a longer list is refused unread


def seal(desired: DesiredSet, signers: Sequence[Signer]) -> bytes:
    """The envelope of ``desired`` signed by every signer, as the bytes published on the desired topic."""
    return seal_payload(desired.to_json(), signers)


def seal_payload(payload: bytes, signers: Sequence[Signer]) -> bytes:
    """The envelope of a desired state's JSON bytes (:func:`seal`; tests seal what no controller would)."""
    envelope = Envelope(payload, PAYLOAD_TYPE, {})
    for signer in signers:
        envelope.sign(signer)
    raw = json.dumps(envelope.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"signed desired state is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    return raw


def open_envelope(raw: bytes | bytearray) -> Envelope:
    """The envelope's structure, checked (size, fields, types); signatures are not verified here."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"desired state is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        data = jsonlimit.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"desired state is not valid JSON: {e}") from None
    if not isinstance(data, dict) or set(data) != {"payload", "payloadType", "signatures"}:
        raise ProtocolError("desired state is not a signed envelope (payload, payloadType, signatures)")
    if data["payloadType"] != PAYLOAD_TYPE:
        raise ProtocolError(f"envelope carries {str(data['payloadType'])[:80]!r}, not {PAYLOAD_TYPE}")
    signatures = data["signatures"]
    if not isinstance(signatures, list) or not 0 < len(signatures) <= MAX_SIGNATURES:
        raise ProtocolError(f"envelope must carry 1 to {MAX_SIGNATURES} signatures")
    try:
        return Envelope(_b64(data["payload"]), PAYLOAD_TYPE, _signatures(signatures))
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise ProtocolError(f"envelope is malformed: {type(e).__name__}: {e}"[:200]) from None


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("base64 field is not a string")
    return base64.b64decode(value, validate=True)


def _signatures(items: list[Any]) -> dict[str, Signature]:
    found: dict[str, Signature] = {}
    for item in items:
        if not isinstance(item, dict) or set(item) != {"keyid", "sig"} or not isinstance(item["keyid"], str):
            raise ValueError("a signature must be {keyid, sig}")
        if item["keyid"] in found:
            raise ValueError(f"two signatures by key {item['keyid'][:16]}")
        found[item["keyid"]] = Signature(item["keyid"], _b64(item["sig"]).hex())
    return found
