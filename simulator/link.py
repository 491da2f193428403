"""A simulated device's MQTT link: ``AgentLink`` itself, with its network on the shared loop.

Everything on the wire is the agent's: topics, client id (the device id),
persistent session, will (Status offline with the boot sequence), retained
Status online and the desired-state subscription renewed on every connect,
device/boot/seq/ts stamping, only its own desired topic handed on (to the director). Only the
transport differs: no sender thread and no connection thread per device; a
message is handed straight to paho, which keeps QoS 1 messages while the
broker is away and sends them after the reconnect (heartbeats are not sent
while offline, so what waits is a pass's few events and reports).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.link import AgentLink
from edgefleet.common import protocol
from edgefleet.common.mqtt import BrokerURL
from edgefleet.common.protocol import Channel, ModelStatus, Reported, Status

from .network import NetworkLoop

M = TypeVar("M", bound=protocol.Message)


def broker_url_text(url: BrokerURL) -> str:
    return f"{'mqtts' if url.tls else 'mqtt'}://{url.host}:{url.port}?protocol={url.protocol}"


class SimLink(AgentLink):
    """Implements the Reconciler's ``Link`` protocol; ``on_desired`` runs on the network thread."""

    def __init__(
        self,
        loop: NetworkLoop,
        config: AgentConfig,
        url: BrokerURL,
        boot: int,
        on_desired: Callable[[bytes], None],
        session_expiry_s: int,
        bind_address: str = "",
    ) -> None:
        config = dataclasses.replace(config, broker_url=broker_url_text(url))
        super().__init__(config, boot, on_desired, session_expiry_s=session_expiry_s)
        if bind_address:
            self._conn.options = dataclasses.replace(self._conn.options, bind_address=bind_address)
        self.connection = loop.connection(self._conn)

    def start(self) -> None:
        self.connection.start()

    def stop(self, after: Callable[[], None] | None = None, forget: bool = False) -> None:  # type: ignore[override]
        """Retained offline status (the goodbye ``AgentLink.stop`` says), then DISCONNECT.

        ``forget`` empties the device's retained topics instead (a test fleet leaving a shared broker).
        """
        client = self.connection.client
        if self.connected:
            if forget:
                for channel in (Channel.DESIRED, Channel.REPORTED, Channel.STATUS):
                    client.publish(self._topic(channel), b"", qos=1, retain=True)
            else:
                goodbye = Status(device=self.device, boot=self.boot, online=False, ts=time.time())
                client.publish(self._topic(Channel.STATUS), goodbye.to_json(), qos=1, retain=True)
        self.connection.disconnect(after=after)

    def cut(self, after: Callable[[], None] | None = None) -> None:
        """Drop the TCP connection without a goodbye (power cut, cable pulled): the broker sends the will."""
        self.connection.disconnect(abrupt=True, after=after)

    def report_statuses(self, models: tuple[ModelStatus, ...], **fields: Any) -> Reported:
        """Publish (retained) a report of statuses the caller keeps itself: a thin device has no
        agent state for ``AgentLink.report`` to read."""
        return self._send(Channel.REPORTED, Reported, retain=True, models=models, **fields)

    def _send(self, channel: Channel, schema: Callable[..., M], retain: bool = False, **fields: Any) -> M:
        with self._outbox:  # seq order is publish order
            self._seq += 1
            message = schema(device=self.device, boot=self.boot, seq=self._seq, **fields)
            message.validate()
            self.connection.client.publish(self._topic(channel), message.to_json(), qos=1, retain=retain)
        return message
