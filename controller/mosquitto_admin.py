"""``BrokerAdmin`` for Mosquitto: its dynamic-security plugin, over the bridge's own connection
(the controller's identity holds the plugin's admin commands). Requests go to
``$CONTROL/dynamic-security/v1``; the answers, matched by correlation data, come back on its
``/response`` topic. Deleting a device's client closes its open session at once.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
from typing import Any

from . import dynsec
from .broker import Bridge
from .errors import Unavailable

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


class MosquittoAdmin:
    def __init__(self, bridge: Bridge, timeout_s: float = TIMEOUT_S) -> None:
        self._bridge = bridge
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._waiting: dict[str, threading.Event] = {}
        self._answers: dict[str, list[dict[str, Any]]] = {}
        bridge.on_control(dynsec.RESPONSE_TOPIC, self._response)

    def admit(self, device_id: str) -> None:
        self._run(dynsec.admit_commands(device_id), f"admit {device_id}")

    def revoke(self, device_id: str) -> None:
        self._run(dynsec.revoke_commands(device_id), f"revoke {device_id}")

    def _run(self, commands: list[dict[str, Any]], what: str) -> None:
        """Send the commands as one request; Unavailable unless each succeeded (or was already done)."""
        tag = secrets.token_hex(8)
        done = threading.Event()
        with self._lock:
            self._waiting[tag] = done
        try:
            request = {"commands": [{**c, "correlationData": f"{tag}:{i}"} for i, c in enumerate(commands)]}
            self._bridge.publish_control(dynsec.CONTROL_TOPIC, json.dumps(request).encode(), self._timeout)
            if not done.wait(self._timeout):
                raise Unavailable(f"Mosquitto did not answer the request to {what} within {self._timeout:g}s: "
                                  "is its dynamic-security plugin loaded (fleetctl broker config)?")
        finally:
            with self._lock:
                self._waiting.pop(tag, None)
                answers = self._answers.pop(tag, [])
        failed = [a["error"] for a in answers if a.get("error") and a["error"] not in dynsec.IDEMPOTENT]
        if failed:
            raise Unavailable(f"Mosquitto refused to {what}: {'; '.join(map(str, failed))}")
        log.info("Mosquitto: %s", what)

    def _response(self, payload: bytes) -> None:
        """Paho's thread: file each answer under the request it belongs to."""
        try:
            responses = json.loads(payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable dynamic-security response dropped")
            return
        by_tag: dict[str, list[dict[str, Any]]] = {}
        for answer in responses if isinstance(responses, list) else []:
            correlation = answer.get("correlationData") if isinstance(answer, dict) else None
            if isinstance(correlation, str):
                by_tag.setdefault(correlation.split(":")[0], []).append(answer)
        with self._lock:
            for tag, answers in by_tag.items():
                if tag in self._waiting:
                    self._answers[tag] = answers
                    self._waiting[tag].set()
