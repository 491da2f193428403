"""The controller API on a real uvicorn server in a thread, over a real database and
fleet home, for tests of the API, enrollment and the fleetctl client.

    with running_controller(tmp_path / "home", database_url) as api:
        api.client().get("/v1/devices")           # operator token
        api.client(token=None).post("/v1/enroll", json=...)
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from edgefleet.controller.api.app import create_app
from edgefleet.controller.api.deps import ApiContext
from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.db.session import Database
from edgefleet.controller.home import init_home
from edgefleet.controller.store import ArtifactStore, open_store
from edgefleet.controller.tokens import (
    OPERATOR_PREFIX,
    new_token,
    register_operator_token,
)
from tests.conftest import free_port

START_TIMEOUT_S = 15.0
_UNSET = object()


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1:<free port>; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_S)


@dataclass
class RunningApi:
    url: str
    token: str
    ctx: ApiContext

    @property
    def db(self) -> Database:
        return self.ctx.db

    @property
    def store(self) -> ArtifactStore:
        return self.ctx.store

    def client(self, token: object = _UNSET) -> httpx.Client:
        """An HTTP client with the operator token, another token, or none (``token=None``)."""
        token = self.token if token is _UNSET else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextlib.contextmanager
def running_controller(home: Path, database_url: str, store: ArtifactStore | None = None,
                       **config: Any) -> Iterator[RunningApi]:
    """A fleet home (keys, root metadata), a migrated database and the API serving both."""
    init_home(home)
    cfg = ControllerConfig(home=home, database_url=database_url, **config)
    db = Database(database_url)
    db.upgrade()
    token = new_token(OPERATOR_PREFIX)
    with db.unit_of_work() as session:
        register_operator_token(session, token, "admin")
    ctx = ApiContext(config=cfg, db=db, store=store or open_store(cfg))
    try:
        with serve(create_app(ctx)) as url:
            yield RunningApi(url=url, token=token, ctx=ctx)
    finally:
        db.dispose()
