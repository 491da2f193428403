"""Bearer-token authentication of API callers: operators (api_tokens) and devices
(devices.token_hash), and the operator's role. The tokens themselves are made in
``controller.tokens``.

Every operator route depends on one of ``require_viewer`` (reads), ``require_deployer``
or ``require_admin``; a valid token whose role is too low gets 403.
"""
from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..db.models import ApiToken, Device
from ..errors import Forbidden, NotFound, Unauthorized
from ..roles import Role
from ..tokens import hash_token
from .deps import ApiContext, get_ctx

MAX_TOKEN_CHARS = 200

_bearer = HTTPBearer(auto_error=False, description="Operator token (HOME/operator-token) or device token")


@dataclass(frozen=True)
class Operator:
    """The caller of an operator endpoint, as written to the audit log."""

    name: str
    role: Role


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
        try:
            role = Role(row.role)
        except ValueError:
            raise Unauthorized(f"operator token {row.name!r} has no known role: revoke it and create another") from None
        return Operator(name=row.name, role=role)


require_viewer = require_operator


def _require(needed: Role) -> Callable[..., Operator]:
    def dependency(request: Request, operator: Operator = Depends(require_operator)) -> Operator:
        if not operator.role.allows(needed):
            raise Forbidden(
                f"token {operator.name!r} has role {operator.role.value}; {request.method} {request.url.path} "
                f"needs {needed.value}: ask an admin (`fleetctl tokens create NAME --role {needed.value}`)")
        return operator

    return dependency


require_deployer = _require(Role.DEPLOYER)
require_admin = _require(Role.ADMIN)


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
