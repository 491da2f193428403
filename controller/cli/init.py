"""``fleetctl init``: create the fleet home, its database schema and the operator token."""
from __future__ import annotations

import click
import sqlalchemy as sa

from edgefleet.common.defaults import fleet_home

from ..db.models import ApiToken, utcnow
from ..db.session import Database
from ..home import init_home, is_initialized
from ..tokens import (
    OPERATOR_PREFIX,
    hash_token,
    new_token,
    read_operator_token,
    register_operator_token,
    write_operator_token,
)
from ._confirm import confirm, yes_option

OPERATOR_NAME = "admin"


@click.command(name="init")
@click.option("--root-threshold", default=1, show_default=True, type=click.IntRange(min=1),
              help="Root keys needed to sign a new root.")
@click.option("--root-keys", default=1, show_default=True, type=click.IntRange(min=1),
              help="Root keys to create (at least the threshold).")
@click.option("--force", is_flag=True,
              help="Replace the keys, metadata and operator token of an existing fleet home (asks first).")
@yes_option
def cli(root_threshold: int, root_keys: int, force: bool, yes: bool) -> None:
    """Create the fleet home ($EDGEFLEET_HOME, else ~/.edgefleet).

    Writes config.toml, the TUF signing keys and initial metadata, migrates the
    database to the newest schema and writes the operator token (0600).

    \b
    Example:
      fleetctl init
      fleetctl init --root-keys 3 --root-threshold 2
    """
    home = fleet_home()
    if force and is_initialized(home):
        confirm(f"Replace the signing keys, TUF metadata and operator token of {home}? Devices enrolled "
                "with its root must be enrolled again", yes)
    config = init_home(home, root_threshold=root_threshold, root_keys=root_keys, force=force)
    previous = read_operator_token(home)
    token = new_token(OPERATOR_PREFIX)
    db = Database(config.effective_database_url)
    try:
        db.upgrade()
        with db.unit_of_work() as session:
            if previous is not None:  # only reachable with --force: the old token stops working
                session.execute(
                    sa.update(ApiToken).where(ApiToken.token_hash == hash_token(previous)).values(revoked_at=utcnow())
                )
            register_operator_token(session, token, OPERATOR_NAME)
    finally:
        db.dispose()
    token_path = write_operator_token(home, token)
    click.echo(f"fleet home:     {home}")
    click.echo(f"database:       {db.safe_url} (schema at the newest revision)")
    click.echo(f"operator token: {token_path} (keep it secret)")
    click.echo("next:           fleetctl controller run")
