"""The database: engine, unit of work, and schema version (Alembic) control.

Data functions take a Session; only :meth:`Database.unit_of_work` opens, commits
and rolls back, and it is the one place database exceptions become the
controller's errors (Unavailable, Conflict).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ..errors import Conflict, InvalidInput, Unavailable

if TYPE_CHECKING:
    from alembic.config import Config

SQLITE_BUSY_TIMEOUT_MS = 10_000   # writers wait this long for the single SQLite write lock
CONNECT_TIMEOUT_S = 5             # PostgreSQL: fail fast when the server is down


def normalize_url(url: str) -> str:
    """Plain ``postgresql://`` (and ``postgres://``) URLs use psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def migrations_dir() -> Path:
    import edgefleet.migrations as migrations

    return Path(migrations.__file__).resolve().parent


def _first_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return text[0] if text else type(original).__name__


READ_ONLY = "edgefleet_read_only"  # execution option: begin a deferred (read) transaction


class Database:
    def __init__(self, url: str, echo: bool = False):
        self.url = normalize_url(url)
        try:
            parsed = make_url(self.url)
        except exc.ArgumentError as e:
            raise InvalidInput("database URL is not valid: use sqlite:///PATH or postgresql://USER@HOST/DB") from e
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self.engine = self._sqlite_engine(parsed, echo)
        elif self.dialect == "postgresql":
            self.engine = sa.create_engine(
                self.url, echo=echo, pool_pre_ping=True,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
            )
        else:
            raise InvalidInput(f"database {self.dialect!r} is not supported: use SQLite or PostgreSQL")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @staticmethod
    def _sqlite_engine(parsed: sa.URL, echo: bool) -> sa.Engine:
        path = parsed.database if parsed.database != ":memory:" and not parsed.query.get("uri") else None
        if path:
            directory = Path(path).parent
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Unavailable(f"database unreachable: cannot create directory {directory}: {e.strerror}") from e
            # Owner-only (its -wal and -shm files take its mode): it holds token hashes and the audit.
            # Created here, before this process has a connection: closing any descriptor of the
            # file drops every POSIX lock the process holds on it, and another process sharing
            # the database would then take its WAL away (seen as "disk I/O error").
            with contextlib.suppress(FileExistsError, OSError):  # sqlite itself then says what is wrong
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        engine = sa.create_engine(parsed, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
            # SQLAlchemy emits BEGIN itself (below), so pysqlite must not.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # IMMEDIATE takes the write lock up front: a read-then-write unit then
            # waits its turn (busy timeout) instead of failing on lock upgrade.
            # A read-only unit must not: WAL readers never block the writer.
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for messages."""
        return make_url(self.url).render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Database({self.safe_url!r})"

    def dispose(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """A Session in one transaction: committed on success, rolled back on any error."""
        with translate_errors(), self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A Session for reads only: on SQLite it takes no write lock, so a long read (a
        fleet-wide scan) never holds up the MQTT ingest. Writes in it are rolled back."""
        with (
            translate_errors(),
            Session(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False) as session,
        ):
            try:
                yield session
            finally:
                session.rollback()

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A Core connection in one transaction (for bulk statements and locks)."""
        with translate_errors(), self.engine.begin() as connection:
            yield connection

    # --- schema version -------------------------------------------------

    def _alembic_config(self, connection: sa.Connection | None = None) -> Config:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        config.attributes["connection"] = connection
        return config

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with translate_errors(), self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        if head is None:
            raise Unavailable(
                f"no migrations found in {migrations_dir()}: the installation is broken, reinstall edgefleet"
            )
        return head

    def check_schema(self) -> None:
        """Refuse to run on a schema other than the code's newest revision."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise Unavailable(
                f"database schema is at {current or 'nothing (empty database)'}, code needs {head}: "
                "run `fleetctl db upgrade`"
            )

    def upgrade(self, revision: str = "head") -> None:
        self._migrate("upgrade", revision)

    def downgrade(self, revision: str) -> None:
        self._migrate("downgrade", revision)

    def _migrate(self, direction: str, revision: str) -> None:
        from alembic import command
        from alembic.util import CommandError

        with translate_errors(), self.engine.connect() as connection:
            # SQLite batch migrations copy and drop tables; with foreign keys on, the
            # drop would cascade into children. The pragma only works outside a transaction.
            self._sqlite_foreign_keys(connection, False)
            try:
                with connection.begin():
                    getattr(command, direction)(self._alembic_config(connection), revision)
                    self._sqlite_check_foreign_keys(connection)
            except CommandError as e:
                raise InvalidInput(f"cannot {direction} to {revision!r}: {_first_line(e)}") from e
            finally:
                self._sqlite_foreign_keys(connection, True)

    def _sqlite_foreign_keys(self, connection: sa.Connection, on: bool) -> None:
        if self.dialect == "sqlite":
            driver = connection.connection.driver_connection
            assert driver is not None  # a connection in use has its DB-API connection
            driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")

    def _sqlite_check_foreign_keys(self, connection: sa.Connection) -> None:
        if self.dialect == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise Conflict(f"migration left {len(broken)} row(s) with dangling foreign keys, e.g. {broken[0]}")


def _missing_table(error: exc.DBAPIError) -> bool:
    # PostgreSQL: SQLSTATE 42P01 undefined_table; SQLite has no code, only the text.
    return getattr(error.orig, "sqlstate", None) == "42P01" or "no such table" in str(error.orig)


def _contended(error: exc.DBAPIError) -> bool:
    # PostgreSQL: 40P01 deadlock_detected, 40001 serialization_failure; SQLite: the busy timeout ran out.
    return getattr(error.orig, "sqlstate", None) in ("40P01", "40001") or "database is locked" in str(error.orig)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Database exceptions -> the controller's error tree, one line each."""
    try:
        yield
    except (exc.OperationalError, exc.ProgrammingError) as e:
        if _missing_table(e):
            raise Unavailable(f"database schema is missing ({_first_line(e)}): run `fleetctl db upgrade`") from e
        if isinstance(e, exc.ProgrammingError):
            raise
        if _contended(e):
            raise Unavailable(f"database busy: {_first_line(e)}; retry") from e
        raise Unavailable(f"database unreachable: {_first_line(e)}") from e
    except exc.IntegrityError as e:
        raise Conflict(f"conflicts with existing data: {_first_line(e)}") from e
    except (exc.InterfaceError, exc.DisconnectionError, exc.TimeoutError) as e:
        raise Unavailable(f"database unreachable: {_first_line(e)}") from e
