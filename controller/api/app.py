"""The controller's HTTP API: one FastAPI app, one router per noun.

Every error leaves as ``{"error": "one line"}`` with the status of its
ControllerError class (a database that is down is Unavailable: 503).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from importlib.metadata import version

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import ControllerError
from . import (
    audit,
    certificates,
    dashboard,
    data,
    devices,
    enroll,
    metrics,
    models,
    repository,
    rollouts,
    samples,
    tokens,
    views,
)
from .deps import ApiContext, get_ctx
from .limits import BodyLimit

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 1024 * 1024
# Endpoints that take uploads up to config.max_upload_bytes; every other body is JSON.
UPLOAD_PATHS = re.compile(r"^/v1/devices/[^/]+/samples$")

health = APIRouter(tags=["health"])


@health.get("/healthz", summary="Liveness and database reachability")
def healthz(ctx: ApiContext = Depends(get_ctx)) -> dict[str, str]:
    with ctx.db.unit_of_work() as session:
        session.execute(sa.text("SELECT 1"))
    return {"status": "ok"}


# Every router the app serves, one per noun.
ROUTERS: tuple[APIRouter, ...] = (
    health, repository.router, enroll.router, certificates.router, samples.router, devices.router,
    models.router, rollouts.router, data.router, audit.router, tokens.router, metrics.router, views.router,
    dashboard.router,
)


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="edgefleet controller",
        version=version("edgefleet"),
        description="Operator API (bearer operator token), device API (bearer device token), TUF repository.",
        docs_url=None, redoc_url=None,  # /docs is served from the controller's own files (api/dashboard.py)
    )
    app.state.ctx = ctx
    for router in ROUTERS:
        app.include_router(router)
    upload_limit = ctx.config.max_upload_bytes
    app.add_middleware(
        BodyLimit, limit_for=lambda path: upload_limit if UPLOAD_PATHS.match(path) else MAX_JSON_BYTES
    )
    app.add_middleware(repository.WholeFiles, store=ctx.store)  # outermost: before the body limit and routing
    app.add_exception_handler(ControllerError, _controller_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _controller_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ControllerError)
    if exc.http_status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return _error(exc.http_status, str(exc), headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return _error(400, f"{where}: {first.get('msg', 'invalid')}{more}")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error ({type(exc).__name__}); see the controller log")
