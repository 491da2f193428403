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
import re
import secrets
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.common.errors import StorageError
from edgefleet.common.fs import atomic_write

from .db.models import ApiToken, utcnow
from .errors import Conflict, InvalidInput, NotFound, Unavailable
from .roles import Role

OPERATOR_PREFIX = "efo_"
DEVICE_PREFIX = "efd_"
ENROLL_PREFIX = "efe_"
OPERATOR_TOKEN_FILE = "operator-token"  # noqa: S105 - a file name, not a token
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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


def create_operator_token(session: Session, name: str, role: Role) -> tuple[ApiToken, str]:
    """A new operator token named ``name`` (unique among live tokens): its row and its secret,
    of which only the hash is stored."""
    if not TOKEN_NAME.match(name):
        raise InvalidInput(f"token name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'")
    if live_tokens(session, name):
        raise Conflict(f"a live token is already named {name!r}: revoke it first (`fleetctl tokens revoke {name}`)")
    token = new_token(OPERATOR_PREFIX)
    row = ApiToken(name=name, role=role.value, token_hash=hash_token(token), created_at=utcnow())
    session.add(row)
    return row, token


def live_tokens(session: Session, name: str | None = None) -> list[ApiToken]:
    """Operator tokens not revoked, oldest first (all of them, or those named ``name``)."""
    query = sa.select(ApiToken).where(ApiToken.revoked_at.is_(None)).order_by(ApiToken.id)
    if name is not None:
        query = query.where(ApiToken.name == name)
    return list(session.scalars(query))


def revoke_operator_token(session: Session, name: str) -> ApiToken:
    """Revoke the live token named ``name``; the last live admin token is kept (it is the way back in)."""
    named = live_tokens(session, name)
    if not named:
        raise NotFound(f"no live operator token is named {name!r}: see `fleetctl tokens list`")
    admins = [t for t in live_tokens(session) if t.role == Role.ADMIN.value]
    if all(t in named for t in admins):
        raise Conflict(f"{name!r} is the last admin token: create another admin token before revoking it")
    now = utcnow()
    for token in named:
        token.revoked_at = now
    return named[0]


def register_operator_token(session: Session, token: str, name: str, role: Role = Role.ADMIN) -> bool:
    """Make ``token`` a valid operator token (idempotent); True when it was new.

    The controller registers HOME/operator-token at start, so the file written
    by `fleetctl init` keeps working after database_url points elsewhere.
    """
    token_hash = hash_token(token)
    if session.scalar(sa.select(ApiToken.id).where(ApiToken.token_hash == token_hash)) is not None:
        return False
    session.add(ApiToken(name=name, role=role.value, token_hash=token_hash))
    return True
