"""``fleetctl devices``: list, show, label, enroll and remove devices (through the API)."""
from __future__ import annotations

import click

from ..errors import InvalidInput
from ..rollout.spec import parse_duration
from ._confirm import confirm, yes_option
from ._output import emit, emit_record, emitted_as_json, format_option, table
from .client import ApiClient, api_command

LIST_COLUMNS = ["id", "online", "enrolled", "hardware_class", "active", "labels", "last_seen"]
SHOW_FIELDS = ["id", "online", "enrolled", "hardware_class", "labels", "last_seen", "enrolled_at", "boot"]
MODEL_COLUMNS = ["model", "version", "variant", "release", "memory_kb"]
EVENT_COLUMNS = ["ts", "deployment", "generation", "state", "model", "version", "variant", "detail"]


def _active(device: dict) -> dict:
    """Every model the device serves in one cell: ``digits 1.0.0 cpu-fp32, ocr-cls 2 cpu-int8``."""
    served = [f"{m['model']} {m['version']} {m['variant']}" for m in device.get("active") or []]
    return {**device, "active": ", ".join(served) or None}


def parse_labels(items: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` sets a label, ``key-`` removes one (kubectl's syntax)."""
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            to_set[key] = value
        elif item.endswith("-") and len(item) > 1:
            to_remove.append(item[:-1])
        else:
            raise InvalidInput(f"label {item!r} is not valid: use key=value to set or key- to remove")
    return to_set, to_remove


@click.group(name="devices")
def cli() -> None:
    """Enroll, inspect, label and remove devices.

    \b
    Example:
      fleetctl devices enroll pi-042 --label site=berlin
      fleetctl devices list --selector site=berlin
      fleetctl devices label pi-042 hw=rpi4 old-
    """


@cli.command(name="list")
@click.option("-l", "--selector", default="", help="Label selector, e.g. site=berlin,hw.arch=aarch64.")
@format_option
@api_command
def list_devices(client: ApiClient, selector: str, fmt: str) -> None:
    """List devices."""
    devices = client.get("/v1/devices", selector=selector or None)
    emit(devices if fmt == "json" else [_active(d) for d in devices], fmt, LIST_COLUMNS)


@cli.command()
@click.argument("device_id")
@format_option
@api_command
def show(client: ApiClient, device_id: str, fmt: str) -> None:
    """Show one device, including its hardware profile and desired/reported state."""
    device = client.get(f"/v1/devices/{device_id}")
    if emitted_as_json(device, fmt):
        return
    emit_record(device, fmt, SHOW_FIELDS)
    click.echo("models:" if device["active"] else "models: none served")
    if device["active"]:
        click.echo("\n".join(f"  {line}" for line in table(device["active"], MODEL_COLUMNS).splitlines()))
    hardware = device.get("hardware") or {}
    if hardware:
        click.echo("hardware:")
        for key in sorted(hardware):
            click.echo(f"  {key}: {hardware[key]}")


@cli.command()
@click.argument("device_id")
@click.option("--rollout", "deployment", metavar="ID", help="Only the events of this rollout.")
@format_option
@api_command
def events(client: ApiClient, device_id: str, deployment: str | None, fmt: str) -> None:
    """Show a device's update events (each execution step it reported), oldest first.

    \b
    Example:
      fleetctl devices events pi-042 --rollout digits-1.1.0
    """
    emit(client.get(f"/v1/devices/{device_id}/events", deployment=deployment), fmt, EVENT_COLUMNS)


@cli.command()
@click.argument("device_id")
@click.argument("labels", nargs=-1, required=True)
@format_option
@api_command
def label(client: ApiClient, device_id: str, labels: tuple[str, ...], fmt: str) -> None:
    """Set (key=value) and remove (key-) labels of a device.

    \b
    Example:
      fleetctl devices label pi-042 site=berlin hw=x ring-
    """
    to_set, to_remove = parse_labels(labels)
    device = client.patch(f"/v1/devices/{device_id}/labels", {"set": to_set, "remove": to_remove})
    emit(device if fmt == "json" else _active(device), fmt, ["id", "labels"])


@cli.command()
@click.argument("name")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label the device (repeatable).")
@click.option("--ttl", default="24h", show_default=True, help="How long the token stays valid (e.g. 30m, 2h).")
@format_option
@api_command
def enroll(client: ApiClient, name: str, labels: tuple[str, ...], ttl: str, fmt: str) -> None:
    """Create a one-time enrollment token for device NAME.

    \b
    Example:
      fleetctl devices enroll pi-042 --label site=berlin
      # then on the device:
      fleet-agent enroll --controller http://controller:8470 --token <token>
    """
    to_set, to_remove = parse_labels(labels)
    if to_remove:
        raise InvalidInput("--label takes key=value")
    issued = client.post(
        f"/v1/devices/{name}/enroll-token", {"labels": to_set, "ttl_s": int(parse_duration(ttl, "--ttl"))}
    )
    if emitted_as_json(issued, fmt):
        return
    click.echo(f"enrollment token for {issued['device_id']} (one use, expires {issued['expires_at']}):")
    click.echo(issued["token"])
    click.echo(f"on the device: fleet-agent enroll --controller {client.base_url} --token {issued['token']}")


@cli.command()
@click.argument("device_id")
@yes_option
@api_command
def remove(client: ApiClient, device_id: str, yes: bool) -> None:
    """Remove a device: its tokens stop working, its records are deleted and a managed
    broker (Mosquitto, broker_admin) refuses it and closes its open session at once.
    Asks first unless --yes."""
    confirm(f"Remove device {device_id}? It must be enrolled again to come back", yes)
    client.delete(f"/v1/devices/{device_id}")
    click.echo(f"removed {device_id}")
