"""The installed edgefleet version, as the agent reports it (``fleet-agent --version``, Reported)."""
from __future__ import annotations

from importlib import metadata


def agent_version() -> str:
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"
