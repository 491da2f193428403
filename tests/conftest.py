"""Shared fixtures: real services (skipped with a reason when absent, failed in CI)
and the offline-generated models of ``bench/models.py``."""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.ports import free_port as free_port  # the tests' own import of it

REPO = Path(__file__).resolve().parent.parent
# .ci/run sets this: a missing service is then a failure, never a skip.
REQUIRE_SERVICES = os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1"
MOSQUITTO = ("127.0.0.1", 1883)
POSTGRES = ("127.0.0.1", 5432)


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    if not reachable(host, port):
        missing(f"{name} is not reachable at {host}:{port}; start it (see .ci/run) to run this test")


def need_program(name: str, install_hint: str) -> str:
    """The program's path; a missing one skips the test locally and fails it in CI."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        missing(f"{name} is not installed ({install_hint}; .ci/run does)")
    return path


def missing(message: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(message + " [EDGEFLEET_REQUIRE_SERVICES=1]")
    pytest.skip(message)


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    need_service("Mosquitto", *MOSQUITTO)
    return f"mqtt://{MOSQUITTO[0]}:{MOSQUITTO[1]}"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    need_service("PostgreSQL", *POSTGRES)
    return f"postgresql+psycopg://postgres@{POSTGRES[0]}:{POSTGRES[1]}"


@pytest.fixture
def make_postgres_db(postgres_server: str) -> Iterator[Callable[[], str]]:
    """Factory of fresh, empty PostgreSQL databases, dropped after the test."""
    import sqlalchemy as sa

    admin = sa.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make() -> str:
        name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return f"{postgres_server}/{name}"

    yield make
    with admin.connect() as c:
        for name in created:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_url(make_postgres_db) -> str:
    return make_postgres_db()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'controller.db'}"
    return request.getfixturevalue("make_postgres_db")()


# --- models (generated offline, cached across runs under .cache/models) ----


@pytest.fixture(scope="session")
def model_cache() -> Path:
    path = Path(os.environ.get("EDGEFLEET_MODEL_CACHE", REPO / ".cache" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def digits(model_cache):
    """The scikit-learn digits classifier: .model, .eval_data, .calibration_data paths."""
    from bench import models

    return models.digits(model_cache)


@pytest.fixture(scope="session")
def resnet50(model_cache) -> Path:
    from bench import models

    return models.resnet50(model_cache)


@pytest.fixture(scope="session")
def broken_model(model_cache) -> Path:
    from bench import models

    return models.broken(model_cache)


@pytest.fixture(scope="session")
def slow_model(model_cache) -> Path:
    from bench import models

    return models.slow_digits(model_cache)


@pytest.fixture(scope="session")
def wrong_model(model_cache) -> Path:
    from bench import models

    return models.wrong_digits(model_cache)


@pytest.fixture
def db(database_url):
    """A migrated controller database, once on SQLite and once on PostgreSQL."""
    from edgefleet.controller.db.session import Database

    database = Database(database_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def ocr_models(model_cache) -> dict[str, Path]:
    """PP-OCR's pretrained cls, det and rec models, as `make models` fetched them (never downloaded here)."""
    from bench import ocr

    paths = ocr.model_paths(model_cache)
    if not all(p.is_file() for p in paths.values()):
        missing(f"the OCR models are not in {model_cache}; run `make models`")
    return paths


def ocr_set(model_cache: Path, task: str, eval_count: int, calibration_count: int):
    """A small rendered set of one OCR task (bench/ocr.py), cached under the model cache."""
    from bench import ocr

    return ocr.task_set(model_cache, task, eval_count, calibration_count)
