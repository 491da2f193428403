"""Defaults that tools, docs and tests share."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONTROLLER_URL = "http://127.0.0.1:8470"
EMBEDDED_BROKER_HOST = "127.0.0.1"
EMBEDDED_BROKER_PORT = 1884
DEFAULT_BROKER_URL = f"mqtt://{EMBEDDED_BROKER_HOST}:{EMBEDDED_BROKER_PORT}"  # the controller's embedded broker
DEFAULT_SERVE_ADDRESS = "127.0.0.1:8471"      # the agent's local inference server
DEFAULT_STATE_DIR = Path("/var/lib/edgefleet-agent")


def fleet_home() -> Path:
    """``$EDGEFLEET_HOME``, else ``~/.edgefleet``."""
    return Path(os.environ.get("EDGEFLEET_HOME") or Path.home() / ".edgefleet")
