"""Bearer tokens: operators (api_tokens) and devices (devices.token_hash).

Tokens are 256-bit random strings with a kind prefix (so leaked ones are easy
to recognise); only their SHA-256 is stored. A fast hash is enough for secrets
with this much entropy; MQTT passwords use Mosquitto's PBKDF2 format so the same
hash can feed a Mosquitto password file.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ..db.models import ApiToken, Device
from ..errors import NotFound, Unauthorized, Unavailable
from .deps import ApiContext, get_ctx

OPERATOR_PREFIX = "efo_"
DEVICE_PREFIX = "efd_"
ENROLL_PREFIX = "efe_"
MAX_TOKEN_CHARS = 200
OPERATOR_TOKEN_FILE = "operator-token"
MQTT_PBKDF2_ITERATIONS = 101  # Mosquitto's own default for "$7$" hashes

_bearer = HTTPBearer(auto_error=False, description="Operator token (HOME/operator-token) or device token")


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hash_mqtt_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto ``$7$`` format: PBKDF2-HMAC-SHA512 with a 12-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MQTT_PBKDF2_ITERATIONS)
    return f"$7${MQTT_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mqtt_password(password: str, stored: str) -> bool:
    try:
        _, kind, iterations, salt, digest = stored.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@dataclass(frozen=True)
class Operator:
    """The caller of an operator endpoint, as written to the audit log."""

    name: str
    role: str


def operator_token_file(home: Path) -> Path:
    return home / OPERATOR_TOKEN_FILE


def read_operator_token(home: Path) -> str | None:
    try:
        return operator_token_file(home).read_text().strip() or None
    except FileNotFoundError:
        return None


def write_operator_token(home: Path, token: str) -> Path:
    """Write HOME/operator-token atomically, readable by its owner only."""
    path = operator_token_file(home)
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".tmp-")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise Unavailable(f"cannot write {path}: {e.strerror}") from e
    return path


def register_operator_token(session: Session, token: str, name: str, role: str = "admin") -> bool:
    """Make ``token`` a valid operator token (idempotent); True when it was new.

    The controller registers HOME/operator-token at start, so the file written
    by `fleetctl init` keeps working after database_url points elsewhere.
    """
    token_hash = hash_token(token)
    if session.scalar(sa.select(ApiToken.id).where(ApiToken.token_hash == token_hash)) is not None:
        return False
    session.add(ApiToken(name=name, role=role, token_hash=token_hash))
    return True


def _token(credentials: HTTPAuthorizationCredentials | None, what: str) -> str:
    if credentials is None:
        raise Unauthorized(f"missing bearer token: send 'Authorization: Bearer <{what}>'")
    token = credentials.credentials
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized(f"bearer token is longer than {MAX_TOKEN_CHARS} characters")
    return token


def require_operator(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ctx: ApiContext = Depends(get_ctx),
) -> Operator:
    token = _token(credentials, "operator token")
    # Looked up by the hash of a 256-bit secret: lookup timing reveals nothing an attacker can steer.
    with ctx.db.unit_of_work() as session:
        row = session.scalar(
            sa.select(ApiToken).where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
        )
        if row is None:
            raise Unauthorized("operator token is not valid: use the one in HOME/operator-token (see `fleetctl init`)")
        return Operator(name=row.name, role=row.role)


def require_device(
    device_id: str,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ctx: ApiContext = Depends(get_ctx),
) -> Device:
    """The device named in the path, when the bearer token is that device's token."""
    token = _token(credentials, "device token")
    with ctx.db.unit_of_work() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFound(f"device {device_id!r} is unknown: enroll it with `fleetctl devices enroll {device_id}`")
        if device.token_hash is None or not hmac.compare_digest(device.token_hash, hash_token(token)):
            raise Unauthorized(f"device token is not valid for device {device_id!r}: re-enroll the device")
        session.expunge(device)
        return device
