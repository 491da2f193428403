"""What the controller asks of the broker about a device's identity: admit it, revoke it.

``admit`` runs when the controller issues the device a certificate; ``revoke`` when the
device is removed, and must refuse it from then on and close its open session at once.
``MosquittoAdmin`` (``mosquitto_admin``) implements both with Mosquitto's dynamic-security
plugin. A broker that reads credentials from the controller's database needs no ``admit``.
"""
from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class BrokerAdmin(Protocol):
    def admit(self, device_id: str) -> None:
        """Let the device's identity connect and use its own topics (idempotent)."""

    def revoke(self, device_id: str) -> None:
        """Refuse the device from now on and close its open session at once (idempotent)."""


class NoBrokerAdmin:
    """A broker the controller cannot administer: identities and sessions are managed there."""

    def admit(self, device_id: str) -> None:
        pass

    def revoke(self, device_id: str) -> None:
        log.warning("device %s removed; the broker keeps any open session of it until it checks its "
                    "credentials again: disconnect it there", device_id)
