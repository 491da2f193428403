"""Secrets the controller hands out: operator, device and enrollment tokens, MQTT passwords.

Tokens are 256-bit random strings with a kind prefix (so leaked ones are easy
to recognise); only their SHA-256 is stored. A fast hash is enough for secrets
with this much entropy. MQTT passwords use Mosquitto's PBKDF2 ``$7$`` format so
the same hash can feed a Mosquitto password file. No web framework here: fleetctl
imports this module too.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.common.errors import StorageError
from edgefleet.common.fs import atomic_write

from .db.models import ApiToken
from .errors import Unavailable

OPERATOR_PREFIX = "efo_"
DEVICE_PREFIX = "efd_"
ENROLL_PREFIX = "efe_"
OPERATOR_TOKEN_FILE = "operator-token"  # noqa: S105 - a file name, not a token
MQTT_PBKDF2_ITERATIONS = 101  # Mosquitto's own default for "$7$" hashes


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
    try:
        atomic_write(path, f"{token}\n".encode())  # 0600
    except StorageError as e:
        raise Unavailable(str(e)) from e
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
