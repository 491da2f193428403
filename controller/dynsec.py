"""Mosquitto's dynamic-security plugin, as edgefleet uses it: roles, clients and commands.

Mosquitto 2.0.11's dynsec does not expand ``%u``/``%c`` in ACL topics, so each device gets
a role of its own naming its topics literally. A client certificate is the whole login
(``use_identity_as_username``: the plugin's password check never runs), so a device is
admitted by creating its client and role, and revoked by deleting them (which also
closes its open session). Every other topic is denied by default.
"""
from __future__ import annotations

from typing import Any

from edgefleet.common.protocol import Channel, topic

from .broker import INBOUND

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
CONTROLLER_ROLE = "edgefleet-controller"
DEVICE_ROLE_PREFIX = "edgefleet-device-"
ALL = "edgefleet/v1/#"
# Errors a repeated admit or revoke meets: the wanted state is already there.
IDEMPOTENT = {"Role already exists", "Client already exists", "Client not found", "Role not found"}


def _acl(kind: str, topic_filter: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic_filter, "allow": True}


def device_role(device_id: str) -> dict[str, Any]:
    """Publish its own reported/events/telemetry/status; subscribe to and receive its own desired."""
    desired = topic(device_id, Channel.DESIRED)
    acls = [_acl("publishClientSend", topic(device_id, channel)) for channel in INBOUND]
    acls += [_acl("subscribeLiteral", desired), _acl("publishClientReceive", desired)]
    return {"rolename": DEVICE_ROLE_PREFIX + device_id, "acls": acls}


def device_client(device_id: str) -> dict[str, Any]:
    return {"username": device_id, "roles": [{"rolename": DEVICE_ROLE_PREFIX + device_id}]}


def controller_role(share_group: str) -> dict[str, Any]:
    """Everything under edgefleet/v1/, the fleet's share group (no other identity may join it),
    and the dynamic-security commands that admit and revoke devices."""
    return {"rolename": CONTROLLER_ROLE, "acls": [
        _acl("publishClientSend", ALL), _acl("publishClientReceive", ALL),
        _acl("subscribePattern", ALL), _acl("subscribePattern", f"$share/{share_group}/{ALL}"),
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("subscribeLiteral", RESPONSE_TOPIC), _acl("publishClientReceive", RESPONSE_TOPIC),
    ]}


def initial_config(controllers: list[str], share_group: str, device_ids: list[str]) -> dict[str, Any]:
    """The plugin's file: the controller's identities (one per replica) and every device enrolled so far."""
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": [{"username": c, "roles": [{"rolename": CONTROLLER_ROLE}]} for c in controllers]
        + [device_client(d) for d in device_ids],
        "groups": [],
        "roles": [controller_role(share_group)] + [device_role(d) for d in device_ids],
    }


def admit_commands(device_id: str) -> list[dict[str, Any]]:
    role = device_role(device_id)
    return [{"command": "createRole", **role},
            {"command": "createClient", **device_client(device_id)}]


def revoke_commands(device_id: str) -> list[dict[str, Any]]:
    """Deleting the client closes its open session at once."""
    return [{"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": DEVICE_ROLE_PREFIX + device_id}]
