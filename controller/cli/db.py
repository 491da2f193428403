"""``fleetctl db``: create and migrate the controller's database schema."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from ..config import ControllerConfig
from ..db.session import Database
from ._confirm import confirm, yes_option
from ._output import emit, format_option


@click.group(name="db")
@click.option("--database-url", metavar="URL", envvar="EDGEFLEET_DATABASE_URL", show_envvar=True,
              help="Database to act on (default: database_url from HOME/config.toml, else HOME/controller.db).")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None) -> None:
    """Create, upgrade and inspect the database schema.

    \b
    Example:
      fleetctl db upgrade
      fleetctl db current --format json
      fleetctl db --database-url postgresql://postgres@127.0.0.1/edgefleet upgrade
    """
    ctx.obj = database_url


@contextlib.contextmanager
def _database(ctx: click.Context) -> Iterator[Database]:
    db = Database(ctx.obj or ControllerConfig.load().effective_database_url)
    try:
        yield db
    finally:
        db.dispose()


def _migrate(ctx: click.Context, direction: str, revision: str) -> None:
    with _database(ctx) as db:
        getattr(db, direction)(revision)
        click.echo(f"{db.safe_url}: schema at {db.current_revision() or 'base (empty)'}")


@cli.command()
@click.argument("revision", default="head")
@click.pass_context
def upgrade(ctx: click.Context, revision: str) -> None:
    """Upgrade the schema to REVISION (default: the newest)."""
    _migrate(ctx, "upgrade", revision)


@cli.command()
@click.argument("revision")
@yes_option
@click.pass_context
def downgrade(ctx: click.Context, revision: str, yes: bool) -> None:
    """Downgrade the schema to REVISION ('base' drops every table). Asks first unless --yes."""
    with _database(ctx) as db:
        where = db.safe_url
    confirm(f"Downgrade the schema of {where} to {revision}? Tables and data newer than it are dropped", yes)
    _migrate(ctx, "downgrade", revision)


@cli.command()
@format_option
@click.pass_context
def current(ctx: click.Context, fmt: str) -> None:
    """Show the schema revision of the database and the one this code needs."""
    with _database(ctx) as db:
        current_rev, head = db.current_revision(), db.head_revision()
    emit({"current": current_rev, "head": head, "up_to_date": current_rev == head}, fmt,
         ["current", "head", "up_to_date"])
