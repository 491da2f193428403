"""Alembic environment for edgefleet.

Revisions are self-contained (explicit ``op.create_table`` …): nothing here imports
the live models, so an old revision keeps meaning what it meant when written.
``Database.upgrade()`` hands over its connection in ``config.attributes``;
the plain ``alembic -c migrations/alembic.ini`` CLI works from the URL.
"""
from __future__ import annotations

from typing import Any

from alembic import context

config = context.config


def _configure_and_run(**kwargs: Any) -> None:
    # SQLite cannot ALTER most things: batch mode copies the table instead.
    context.configure(render_as_batch=True, target_metadata=None, **kwargs)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    _configure_and_run(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection=connection)
        return
    from edgefleet.controller.db.session import Database

    database = Database(config.get_main_option("sqlalchemy.url", ""))  # no URL: Database says what to write
    try:
        with database.engine.begin() as connection:
            _configure_and_run(connection=connection)
    finally:
        database.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
