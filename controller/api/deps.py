"""What every router needs from the running controller, handed over as FastAPI dependencies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastapi import Request

from ..config import ControllerConfig
from ..db.session import Database
from ..store import ArtifactStore


@dataclass
class ApiContext:
    config: ControllerConfig
    db: Database
    store: ArtifactStore
    # Called after a device is removed so its retained MQTT topics are cleared (None: no broker link).
    forget_device: Callable[[str], None] | None = None


def get_ctx(request: Request) -> ApiContext:
    return request.app.state.ctx


def get_store(request: Request) -> ArtifactStore:
    return get_ctx(request).store
