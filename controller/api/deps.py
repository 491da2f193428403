"""What every router needs from the running controller, handed over as FastAPI dependencies."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from ..broker_admin import BrokerAdmin, NoBrokerAdmin
from ..config import ControllerConfig
from ..db.session import Database
from ..metrics import MessageSource
from ..store import ArtifactStore


@dataclass
class ApiContext:
    config: ControllerConfig
    db: Database
    store: ArtifactStore
    broker_admin: BrokerAdmin = field(default_factory=NoBrokerAdmin)
    bridge: MessageSource | None = None  # this process's MQTT bridge, for the ingest metrics


def get_ctx(request: Request) -> ApiContext:
    return request.app.state.ctx


def get_store(request: Request) -> ArtifactStore:
    return get_ctx(request).store
