"""``fleetctl tokens``: operator tokens with a role (viewer, deployer, admin), through the API."""
from __future__ import annotations

import click

from ..roles import Role
from ._output import emit, emit_record, format_option
from .client import ApiClient, api_command

COLUMNS = ["name", "role", "created_at"]
ROLES = click.Choice([r.value for r in Role], case_sensitive=False)


@click.group(name="tokens")
def cli() -> None:
    """Operator tokens: a viewer reads, a deployer also publishes and rolls out, an admin also
    manages devices and tokens.

    \b
    Example:
      fleetctl tokens create ci --role deployer
      fleetctl tokens list
      fleetctl tokens revoke ci
    """


@cli.command()
@click.argument("name")
@click.option("--role", type=ROLES, default=Role.VIEWER.value, show_default=True, help="What the token may do.")
@format_option
@api_command
def create(client: ApiClient, name: str, role: str, fmt: str) -> None:
    """Create the operator token NAME; its secret is printed this once."""
    created = client.post("/v1/tokens", {"name": name, "role": role.lower()})
    emit_record(created, fmt, ["name", "role", "created_at", "token"])
    if fmt != "json":
        click.echo("note: the token is shown only now; pass it with --token or EDGEFLEET_TOKEN", err=True)


@cli.command(name="list")
@format_option
@api_command
def list_tokens(client: ApiClient, fmt: str) -> None:
    """List live operator tokens and their roles (never their secrets)."""
    emit(client.get("/v1/tokens"), fmt, COLUMNS)


@cli.command()
@click.argument("name")
@api_command
def revoke(client: ApiClient, name: str) -> None:
    """Revoke the operator token NAME at once (the last admin token is kept)."""
    client.delete(f"/v1/tokens/{name}")
    click.echo(f"revoked token {name}")
