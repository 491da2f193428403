"""schemathesis over the served OpenAPI schema: every operation, with an operator token of a
role, on a fleet home of its own (`fleetctl init`), answers no 5xx and conforms to its
documented response schemas.

Each operation runs with generated data (valid and invalid, `POSITIVE` and `NEGATIVE`), and
once more with its path pointing at records that exist (an enrolled device with its device
token, a model, a rollout, a sample shard), so that the fuzzing reaches past the 404s.
Generation is derandomized: CI sees the same requests on every run.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import response_schema_conformance

from edgefleet.controller.api.app import create_app
from edgefleet.controller.api.deps import ApiContext
from edgefleet.controller.cli import main
from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.db.models import Variant
from edgefleet.controller.db.session import Database
from edgefleet.controller.store import open_store
from edgefleet.controller.tokens import read_operator_token
from tests.support.api_server import serve
from tests.test_enroll import HARDWARE, SAMPLE_HEADERS, public_key_pem

# Per operation and pass (valid data, invalid data, existing records); more for a deeper local run.
EXAMPLES_PER_OPERATION = int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, response_schema_conformance]
DEVICE = "pi-fuzz"
# The device API authenticates the device, not an operator.
DEVICE_OPERATIONS = {"POST /v1/devices/{device_id}/certificate", "POST /v1/devices/{device_id}/samples"}
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Fleet:
    url: str
    home: Path
    tokens: dict[str, str]         # role -> operator token
    device_token: str
    existing: dict[str, str]       # path parameter -> a value that names an existing record


def fleetctl(home: Path, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env={"EDGEFLEET_HOME": str(home)})
    assert result.exit_code == 0, f"fleetctl {' '.join(args)}: {result.output}"
    return result.stdout


def shard() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez_compressed(buffer, input=rng.random((4, 8), dtype=np.float32), output=rng.random((4, 10), dtype=np.float32))
    return buffer.getvalue()


def seed(url: str, home: Path, db: Database, admin: str, deployer: str) -> tuple[str, dict[str, str]]:
    """An enrolled device (and its token), two releases of a model, a rollout and a sample shard."""
    with db.unit_of_work() as session:
        for release, version in enumerate(["1.0.0", "1.1.0"], start=1):
            session.add(Variant(model="digits", version=version, variant="cpu-fp32", release=release, preference=1,
                                target_path=f"digits/{version}/cpu-fp32.onnx",
                                golden_path=f"digits/{version}/cpu-fp32.golden.npz",
                                accuracy={"top1": 0.97}, size_bytes=1000))
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as client:
        issued = client.post(f"/v1/devices/{DEVICE}/enroll-token", json={"labels": {"site": "lab"}})
        assert issued.status_code == 201, issued.text
        enrolled = client.post("/v1/enroll", json={"token": issued.json()["token"],
                                                   "device_public_key": public_key_pem(), "hardware": HARDWARE})
        assert enrolled.status_code == 200, enrolled.text
        device_token = enrolled.json()["device_token"]
        uploaded = client.post(f"/v1/devices/{DEVICE}/samples", content=shard(),
                               headers={**SAMPLE_HEADERS, "Authorization": f"Bearer {device_token}"})
        assert uploaded.status_code == 201, uploaded.text
        manifest = {"apiVersion": "edgefleet/v1", "kind": "Rollout", "metadata": {"name": "fuzz"},
                    "spec": {"model": "digits", "version": "1.1.0", "selector": "site=lab",
                             "stages": ["50%", "100%"]}}
        created = client.post("/v1/rollouts", json={"manifest": manifest},
                              headers={"Authorization": f"Bearer {deployer}"})
        assert created.status_code == 201, created.text
        samples = client.get("/v1/data/samples").json()
    existing = {"device_id": DEVICE, "name": "digits", "rollout_id": created.json()["id"],
                "sample_id": str(samples[0]["id"]), "path": "repository/metadata/root.json"}
    return device_token, existing


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fuzz") / "home"
    fleetctl(home, "init")
    config = ControllerConfig.load(home, None)
    db = Database(config.effective_database_url)
    ctx = ApiContext(config=config, db=db, store=open_store(config))
    try:
        with serve(create_app(ctx)) as url:
            admin = read_operator_token(home)
            assert admin is not None
            tokens = {"admin": admin}
            created = fleetctl(home, "tokens", "create", "fuzz", "--role", "deployer", "--controller", url, "--format", "json")
            tokens["deployer"] = json.loads(created)["token"]
            device_token, existing = seed(url, home, db, admin, tokens["deployer"])
            yield Fleet(url=url, home=home, tokens=tokens, device_token=device_token, existing=existing)
    finally:
        db.dispose()


def explore(strategy: st.SearchStrategy[schemathesis.Case], label: str, headers: dict[str, str],
            sent: Counter[str]) -> None:
    """Send the strategy's cases with ``headers``; raises the first failure, shrunk."""

    @FUZZ_SETTINGS
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        sent[label] += 1
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

    run()


def fuzz(fleet: Fleet, role: str) -> tuple[Counter[str], list[str]]:
    """Examples sent per operation, and the failures found (one per operation and pass)."""
    schema = schemathesis.openapi.from_url(f"{fleet.url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            pytest.fail(f"the served schema has an invalid operation: {result.err()}")
        operations.append(result.ok())
    # Removals last, so that the passes on existing records find them.
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")
    sent: Counter[str] = Counter()
    failures: list[str] = []
    for operation in operations:
        token = fleet.device_token if operation.label in DEVICE_OPERATIONS else fleet.tokens[role]
        headers = {"Authorization": f"Bearer {token}"}
        existing = {p.name: fleet.existing[p.name] for p in operation.path_parameters if p.name in fleet.existing}
        passes: list[tuple[str, st.SearchStrategy[schemathesis.Case]]] = [
            (mode.value, operation.as_strategy(generation_mode=mode)) for mode in GenerationMode]
        if existing:
            passes.append(("existing", operation.as_strategy(path_parameters=existing)))
        for name, strategy in passes:
            try:
                explore(strategy, operation.label, headers, sent)
            except Unsatisfiable:  # nothing to get wrong: no parameters, or a path that takes any string
                assert name == GenerationMode.NEGATIVE.value, f"{operation.label}: no valid input generated"
            except Exception as e:  # noqa: BLE001 - every failure is collected, then reported together
                failures.append(f"{operation.label} [{name}]: {e}")
    return sent, failures


# The deployer token is CI's operator of record (issue 11); admin reaches the device and token routes.
@pytest.mark.parametrize("role", ["deployer", "admin"])
def test_no_server_errors_on_any_operation(fleet: Fleet, role: str) -> None:
    sent, failures = fuzz(fleet, role)
    schema = httpx.get(f"{fleet.url}/openapi.json").json()
    documented = {f"{method.upper()} {path}" for path, methods in schema["paths"].items() for method in methods}
    assert set(sent) == documented, "\n".join(failures[:3])  # every operation ran (and the setup works)
    assert not failures, "\n\n".join(failures)
    print(f"{role}: {len(sent)} operations, {sum(sent.values())} requests")

