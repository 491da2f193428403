"""``/v1/tokens``: operator tokens and their roles (admin only). A token's secret is shown once,
when it is created; the list never carries secrets or hashes."""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from ..db.models import ApiToken
from ..roles import Role
from ..tokens import create_operator_token, live_tokens, revoke_operator_token
from .audit import record_operator
from .auth import Operator, require_admin
from .deps import ApiContext, get_ctx

router = APIRouter(prefix="/v1/tokens", tags=["tokens"], dependencies=[Depends(require_admin)])


class TokenOut(BaseModel):
    name: str
    role: str
    created_at: datetime

    @classmethod
    def of(cls, row: ApiToken) -> TokenOut:
        return cls(name=row.name, role=row.role, created_at=row.created_at)


class CreateToken(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: Role


class CreatedToken(TokenOut):
    token: str  # the secret: shown this once


@router.get("", response_model=list[TokenOut], summary="Live operator tokens and their roles")
def list_tokens(ctx: ApiContext = Depends(get_ctx)) -> list[TokenOut]:
    with ctx.db.reading() as session:
        return [TokenOut.of(t) for t in live_tokens(session)]


@router.post("", response_model=CreatedToken, status_code=201, summary="Create an operator token with a role")
def create_token(
    body: CreateToken, operator: Operator = Depends(require_admin), ctx: ApiContext = Depends(get_ctx),
) -> CreatedToken:
    with ctx.db.unit_of_work() as session:
        row, token = create_operator_token(session, body.name, body.role)
        record_operator(session, operator, "token.create", body.name, role=body.role.value)
        return CreatedToken(name=row.name, role=row.role, created_at=row.created_at, token=token)


@router.delete("/{name}", status_code=204, summary="Revoke an operator token (not the last admin token)")
def revoke_token(
    name: str, operator: Operator = Depends(require_admin), ctx: ApiContext = Depends(get_ctx),
) -> Response:
    with ctx.db.unit_of_work() as session:
        revoked = revoke_operator_token(session, name)
        record_operator(session, operator, "token.revoke", name, role=revoked.role)
    return Response(status_code=204)
