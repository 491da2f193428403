"""Alembic migrations: the whole chain up and down on SQLite and PostgreSQL, the
migrated schema equals the models, and an out-of-date schema is refused."""
from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner

from edgefleet.controller.cli import main as fleetctl
from edgefleet.controller.db.models import Base
from edgefleet.controller.db.session import Database
from edgefleet.controller.errors import InvalidInput, Unavailable

MODEL_TABLES = set(Base.metadata.tables)


def tables(db: Database) -> set[str]:
    return set(sa.inspect(db.engine).get_table_names()) - {"alembic_version"}


def revisions(db: Database) -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(db._alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


@pytest.fixture
def db(database_url: str):
    database = Database(database_url)
    yield database
    database.dispose()


def test_chain_up_and_down_one_step_at_a_time(db: Database) -> None:
    chain = revisions(db)
    assert chain and chain[-1] == db.head_revision()
    for revision in chain:
        db.upgrade(revision)
        assert db.current_revision() == revision
    assert tables(db) == MODEL_TABLES
    for previous in reversed([None, *chain[:-1]]):
        db.downgrade(previous or "base")
        assert db.current_revision() == previous
    assert tables(db) == set()
    db.upgrade()   # and up again after a full downgrade
    assert tables(db) == MODEL_TABLES


def test_migrated_schema_equals_the_models(db: Database) -> None:
    """Columns, types, nullability, indexes, unique and foreign keys: no drift."""
    db.upgrade()
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_idempotent(db: Database) -> None:
    db.upgrade()
    db.upgrade()
    assert db.current_revision() == db.head_revision()


def test_schema_check_refuses_an_empty_or_old_schema(db: Database) -> None:
    head = db.head_revision()
    with pytest.raises(Unavailable, match=rf"schema is at nothing .*, code needs {head}: run `fleetctl db upgrade`"):
        db.check_schema()
    db.upgrade()
    db.check_schema()
    with db.engine.begin() as connection:   # pretend the schema is from another release
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '0000_old'"))
    with pytest.raises(Unavailable, match=rf"^database schema is at 0000_old, code needs {head}: run `fleetctl db upgrade`$"):
        db.check_schema()


def test_unknown_revision_is_one_line(db: Database) -> None:
    with pytest.raises(InvalidInput, match="cannot upgrade to 'nope'") as caught:
        db.upgrade("nope")
    assert "\n" not in str(caught.value)


def test_fleetctl_db_commands(database_url: str) -> None:
    runner = CliRunner()
    base = ["db", "--database-url", database_url]
    assert '"up_to_date": false' in runner.invoke(fleetctl, [*base, "current", "--format", "json"]).output
    result = runner.invoke(fleetctl, [*base, "upgrade"])
    assert result.exit_code == 0, result.output
    assert "schema at " in result.output
    assert '"up_to_date": true' in runner.invoke(fleetctl, [*base, "current", "--format", "json"]).output
    result = runner.invoke(fleetctl, [*base, "downgrade", "base", "--yes"])
    assert result.exit_code == 0 and "base (empty)" in result.output
    result = runner.invoke(fleetctl, [*base, "downgrade", "zzz", "--yes"])
    assert result.exit_code == 1


def test_fleetctl_db_uses_the_fleet_home_config(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path))
    result = CliRunner().invoke(fleetctl, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "controller.db").is_file()
    Database(f"sqlite:///{tmp_path / 'controller.db'}").check_schema()


def test_unreachable_database_is_one_error_line(tmp_path) -> None:
    from tests.conftest import free_port

    result = CliRunner().invoke(fleetctl, ["db", "--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/x", "upgrade"])
    assert result.exit_code == 1
    assert result.output.startswith("error: database unreachable:") and result.output.count("\n") == 1
