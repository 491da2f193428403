"""Who may do what on a broker the controller runs: the authorization rules, no MQTT here.

A device logs in with its device id as username and must use it as client id; it
may publish only its own reported|events|telemetry|status, subscribe only its own
desired, and leave a will only on its own status. The controller's identity may do
anything; its username and client ids hold a ':', which no device id can (so no
device can take them over). Everything else (``#``, ``+``, other devices) is refused.
"""
from __future__ import annotations

from edgefleet.common import protocol
from edgefleet.common.protocol import Channel

CONTROLLER_USER = "edgefleet:controller"  # ':' is outside protocol.DEVICE_ID: never a device's login
DEVICE_PUBLISHES = frozenset({Channel.REPORTED, Channel.EVENTS, Channel.TELEMETRY, Channel.STATUS})


def reserved_client_id(suffix: str) -> str:
    return f"{CONTROLLER_USER}:{suffix}"[:63]


def connect_refusal(username: str | None, client_id: str | None, will_topic: str | None) -> str | None:
    """Why this (authenticated) login may not connect as it asks, or None if it may."""
    if username == CONTROLLER_USER:
        return None if client_id and client_id.startswith(CONTROLLER_USER + ":") else \
            f"the controller's client id must start with {CONTROLLER_USER}:"
    if not username or client_id != username:
        return f"client id {client_id!r} is not the device id {username!r} it logged in with"
    if will_topic is not None and will_topic != protocol.topic(username, Channel.STATUS):
        return f"will topic {will_topic!r} is not the device's own status topic"
    return None


def may_publish(username: str | None, topic: str) -> bool:
    if username == CONTROLLER_USER:
        return True
    return bool(username) and any(topic == _own(username, channel) for channel in DEVICE_PUBLISHES)


def may_subscribe(username: str | None, topic_filter: str) -> bool:
    return username == CONTROLLER_USER or (bool(username) and topic_filter == _own(username, Channel.DESIRED))


def _own(username: str | None, channel: Channel) -> str:
    return f"{protocol.TOPIC_ROOT}/{username}/{channel.value}"
