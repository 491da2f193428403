"""The controller HTTP API on a real uvicorn server, on SQLite and PostgreSQL."""
from __future__ import annotations

import os

import httpx
import pytest
import sqlalchemy as sa

from edgefleet.controller.api.app import create_app
from edgefleet.controller.api.deps import ApiContext
from edgefleet.controller.api.repository import ByteRange, Unsatisfiable, parse_range
from edgefleet.controller.config import ControllerConfig, StoreConfig
from edgefleet.controller.db.models import ApiToken, AuditEntry, Variant, utcnow
from edgefleet.controller.db.session import Database
from edgefleet.controller.store.local import LocalStore
from edgefleet.controller.store.s3 import S3Store
from tests.conftest import free_port
from tests.support.api_server import running_controller, serve

BLOB = os.urandom(100_000)
BLOB_KEY = "repository/targets/digits/1.0.0/abc.cpu-fp32.onnx"
BIG = os.urandom(3 * (1 << 20) + 7)   # past INLINE_MAX: streamed in chunks
BIG_KEY = "repository/targets/resnet/1.0.0/def.cpu-fp32.onnx"


@pytest.fixture
def api(tmp_path, database_url):
    """A controller per test, on SQLite and on PostgreSQL."""
    with running_controller(tmp_path / "home", database_url) as running:
        yield running


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory):
    """One SQLite-backed controller for the tests that change no state."""
    tmp = tmp_path_factory.mktemp("shared")
    with running_controller(tmp / "home", f"sqlite:///{tmp / 'controller.db'}") as running:
        running.store.put_bytes(BLOB_KEY, BLOB)
        running.store.put_bytes(BIG_KEY, BIG)
        yield running


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    return body["error"]


def test_openapi_schema_is_published(shared_api):
    schema = httpx.get(f"{shared_api.url}/openapi.json").json()
    # one path of every router the app lists: none may go missing from the explicit list
    for path in ("/healthz", "/v1/enroll", "/v1/devices", "/v1/devices/{device_id}/labels", "/v1/models/{name}",
                 "/v1/audit", "/v1/devices/{device_id}/samples", "/repository/{path}",
                 "/v1/rollouts", "/v1/rollouts/{rollout_id}", "/v1/data/samples", "/v1/data/stats"):
        assert path in schema["paths"], path
    assert "EnrollResponse" in schema["components"]["schemas"]


def test_operator_endpoints_need_a_valid_token(api):
    for token in (None, "efo_forged", "x" * 500):
        with api.client(token=token) as client:
            for method, path in (("GET", "/v1/devices"), ("GET", "/v1/models"), ("GET", "/v1/audit"),
                                 ("POST", "/v1/devices/pi-1/enroll-token"), ("DELETE", "/v1/devices/pi-1")):
                response = client.request(method, path, json={} if method == "POST" else None)
                assert response.status_code == 401, (token, method, path)
                assert error_of(response)
                assert response.headers["www-authenticate"] == "Bearer"
    with api.db.unit_of_work() as session:  # nothing was created by the refused calls
        assert session.scalar(sa.select(sa.func.count()).select_from(AuditEntry)) == 0


def test_revoked_operator_token_is_refused(api):
    with api.client() as client:
        assert client.get("/v1/devices").status_code == 200
        with api.db.unit_of_work() as session:
            session.execute(sa.update(ApiToken).values(revoked_at=utcnow()))
        assert client.get("/v1/devices").status_code == 401


def test_device_records_label_remove_and_audit(api):
    with api.client() as client:
        issued = client.post("/v1/devices/pi-1/enroll-token", json={"labels": {"site": "berlin"}})
        assert issued.status_code == 201, issued.text
        assert issued.json()["token"].startswith("efe_")
        client.post("/v1/devices/pi-2/enroll-token", json={})

        devices = client.get("/v1/devices").json()
        assert [(d["id"], d["enrolled"], d["labels"]) for d in devices] == [
            ("pi-1", False, {"site": "berlin"}), ("pi-2", False, {})]
        assert [d["id"] for d in client.get("/v1/devices", params={"selector": "site=berlin"}).json()] == ["pi-1"]
        assert client.get("/v1/devices", params={"selector": "site in (("}).status_code == 400

        labelled = client.patch("/v1/devices/pi-1/labels", json={"set": {"ring": "canary"}, "remove": ["site"]})
        assert labelled.json()["labels"] == {"ring": "canary"}
        assert client.get("/v1/devices/pi-1").json()["labels"] == {"ring": "canary"}

        assert client.delete("/v1/devices/pi-2").status_code == 204
        missing = client.get("/v1/devices/pi-2")
        assert missing.status_code == 404 and "pi-2" in error_of(missing)
        assert client.delete("/v1/devices/pi-2").status_code == 404

        audit = client.get("/v1/audit").json()
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [
        ("operator:admin", "device.remove", "pi-2"),
        ("operator:admin", "device.label", "pi-1"),
        ("operator:admin", "device.enroll-token", "pi-2"),
        ("operator:admin", "device.enroll-token", "pi-1"),
    ]
    assert audit[1]["detail"] == {"set": {"ring": "canary"}, "remove": ["site"]}
    assert "token" not in str(audit[3]["detail"])  # the secret never reaches the log


@pytest.mark.parametrize("path, body, where", [
    ("/v1/devices/pi-1/enroll-token", {"ttl_s": 1}, "ttl_s"),
    ("/v1/devices/pi-1/enroll-token", {"labels": {"bad key!": "x"}}, "labels"),
    ("/v1/devices/-bad/enroll-token", {}, "device_id"),
    ("/v1/enroll", {"token": "x"}, "device_public_key"),
])
def test_invalid_requests_get_one_line_400(shared_api, path, body, where):
    with shared_api.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 400
    assert where in error_of(response)


def test_malformed_json_is_400(shared_api):
    with shared_api.client() as client:
        response = client.post("/v1/enroll", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    error_of(response)


def test_oversized_bodies_are_413(shared_api):
    big = b"x" * (2 * 1024 * 1024)
    with shared_api.client() as client:
        declared = client.post("/v1/enroll", content=big, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and "larger than" in error_of(declared)
        # No Content-Length: counted while streaming.
        streamed = client.post("/v1/enroll", content=iter([big[:600_000]] * 3),
                               headers={"content-type": "application/json"})
        assert streamed.status_code == 413


def test_models_list_and_show(api):
    with api.db.unit_of_work() as session:
        for release, version in enumerate(["1.0.0", "1.1.0"], start=1):
            for preference, variant in enumerate(["cpu-int8", "cpu-fp32"], start=1):
                session.add(Variant(
                    model="digits", version=version, variant=variant, release=release, preference=preference,
                    target_path=f"digits/{version}/{variant}.onnx", golden_path=f"digits/{version}/{variant}.golden.npz",
                    accuracy={"top1": 0.97}, size_bytes=1000 * preference,
                ))
    with api.client() as client:
        models = client.get("/v1/models").json()
        assert [(m["model"], m["latest"], m["versions"], m["variants"]) for m in models] == [
            ("digits", "1.1.0", ["1.1.0", "1.0.0"], ["cpu-int8", "cpu-fp32"])]
        detail = client.get("/v1/models/digits").json()
        assert [v["release"] for v in detail["versions"]] == [2, 1]
        assert detail["versions"][0]["variants"][0]["target_path"] == "digits/1.1.0/cpu-int8.onnx"
        unknown = client.get("/v1/models/nope")
        assert unknown.status_code == 404 and "nope" in error_of(unknown)


# --- repository serving -----------------------------------------------------


def test_repository_serves_whole_objects_publicly(shared_api):
    url = f"{shared_api.url}/{BLOB_KEY}"
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == BLOB
    assert response.headers["content-length"] == str(len(BLOB))
    assert response.headers["accept-ranges"] == "bytes"
    root = httpx.get(f"{shared_api.url}/repository/metadata/root.json")
    assert root.status_code == 200 and root.json()["signed"]["_type"] == "root"


@pytest.mark.parametrize("header, start, end", [(None, 0, len(BIG) - 1), ("bytes=1000-", 1000, len(BIG) - 1),
                                                 ("bytes=5-2097200", 5, 2097200)])
def test_repository_streams_large_objects_whole_and_in_ranges(shared_api, header, start, end):
    response = httpx.get(f"{shared_api.url}/{BIG_KEY}", headers={"Range": header} if header else {})
    assert response.status_code == (200 if header is None else 206)
    assert response.content == BIG[start:end + 1]
    assert response.headers["content-length"] == str(end - start + 1)


@pytest.mark.parametrize("header, start, end", [
    ("bytes=10-19", 10, 19),
    ("bytes=99990-", 99990, 99999),
    ("bytes=-5", 99995, 99999),
    ("bytes=99000-200000", 99000, 99999),
])
def test_repository_range_requests_are_206(shared_api, header, start, end):
    response = httpx.get(f"{shared_api.url}/{BLOB_KEY}", headers={"Range": header})
    assert response.status_code == 206
    assert response.content == BLOB[start:end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/{len(BLOB)}"
    assert response.headers["content-length"] == str(end - start + 1)


@pytest.mark.parametrize("header", ["bytes=100000-", "bytes=500-400", "bytes=-0"])
def test_repository_unsatisfiable_range_is_416(shared_api, header):
    response = httpx.get(f"{shared_api.url}/{BLOB_KEY}", headers={"Range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(BLOB)}"


@pytest.mark.parametrize("path", ["repository/targets/missing.onnx", "repository/targets/../../keys/root.pem",
                                  "repository/", "repository/targets//x",
                                  # a NUL reached the file system (ValueError: 500); a directory, a file as
                                  # a directory and over-long names reached open() (500)
                                  "repository/metadata/root%00.json", "repository/%00", "repository/a%0ab",
                                  "repository/metadata", "repository/metadata/root.json/x",
                                  "repository/" + "a" * 300, "repository/" + "a/" * 600 + "x"])
def test_repository_missing_or_escaping_paths_are_404(shared_api, path):
    response = httpx.get(f"{shared_api.url}/{path}")
    assert response.status_code == 404
    assert "\n" not in error_of(response) and len(error_of(response)) < 200
    routed = httpx.get(f"{shared_api.url}/{path}", headers={"Range": "bytes=0-"})  # past the fast path, to the route
    assert (routed.status_code, routed.content) == (404, response.content)


@pytest.mark.parametrize("path, status", [
    (f"/v1/data/samples/{10**30}", 400),                       # was OverflowError from SQLite: 500
    (f"/v1/data/samples?after={10**30}", 400),                 # was a reset connection
    ("/v1/data/samples?since=2026-01-01T00:00:00", 200),      # no offset means UTC (was a naive-datetime 500)
    ("/v1/data/stats?since=9999-12-31T23:59:59", 200),
    ("/v1/data/samples?since=0001-01-01T00:00:00%2B05:00", 400),  # before year 1 in UTC
])
def test_data_queries_out_of_range_are_4xx_not_500(shared_api, path, status):
    with shared_api.client() as client:
        response = client.get(path)
    assert response.status_code == status, response.text
    if status >= 400:
        error_of(response)


def test_unknown_rollout_state_filter_is_400_and_names_the_states(shared_api):
    with shared_api.client() as client:
        response = client.get("/v1/rollouts", params={"state": "BOGUS"})
        assert response.status_code == 400  # was a LookupError from the enum column: 500
        assert "state 'BOGUS' is unknown; use one of PENDING, RUNNING" in error_of(response)
        assert client.get("/v1/rollouts", params={"state": "running"}).status_code == 200


def test_parse_range_edge_cases():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: whole object (allowed by RFC 9110)
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=0-", 10) == ByteRange(0, 9)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-", 0)


# --- dependencies that are down ----------------------------------------------


def test_database_down_is_503(tmp_path):
    config = ControllerConfig(home=tmp_path)
    db = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/edgefleet")
    ctx = ApiContext(config=config, db=db, store=LocalStore(tmp_path / "store"))
    with serve(create_app(ctx)) as url:
        for method, path, headers in (
            ("GET", "/v1/devices", {"Authorization": "Bearer efo_x"}),
            ("GET", "/healthz", {}),
            ("POST", "/v1/enroll", {}),
        ):
            body = {"token": "efe_x", "device_public_key": "A" * 44, "hardware": {"arch": "x86_64"}}
            response = httpx.request(method, f"{url}{path}", headers=headers, json=body if method == "POST" else None)
            if path == "/v1/enroll":  # a key that does not parse is refused before the database is asked
                assert response.status_code == 400
                continue
            assert response.status_code == 503, (path, response.text)
            assert "database unreachable" in error_of(response)
    db.dispose()


def test_unreachable_store_is_503(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    store = S3Store(StoreConfig(kind="s3", bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}", store=store) as api:
        response = httpx.get(f"{api.url}/repository/metadata/timestamp.json")
    assert response.status_code == 503
    assert "unreachable" in error_of(response)



@pytest.mark.parametrize("spec, where", [
    # NaN reached int(): 500; NaN or Infinity elsewhere was stored, and every range check passed it
    ('"stages": [NaN, 1]', "$.spec.stages[0]: nan"),
    ('"window": {"cron": "0 2 * * *", "duration": NaN}', "$.spec.window.duration: nan"),
    ('"bake": Infinity', "$.spec.bake: inf"),
    ('"gates": {"p99_budget_ms": -Infinity}', "$.spec.gates.p99_budget_ms: -inf"),
    # a deadline of now + this overflowed datetime in the rollout engine
    ('"bake": "99999999999999999999d"', "bake '99999999999999999999d' must be 0 to 3650d"),
    ('"device_timeout": 1e308', "device_timeout 1e+308 must be 0 to 3650d"),
])
def test_rollout_manifest_with_nan_infinity_or_endless_durations_is_400(shared_api, spec, where):
    # written out: json.dumps would refuse to send NaN, as a well-behaved client does
    body = ('{"manifest": {"apiVersion": "edgefleet/v1", "kind": "Rollout", "spec": '
            '{"model": "digits", "version": "1.1.0", "selector": "site=lab", ' + spec + '}}, "dry_run": true}')
    with shared_api.client() as client:
        response = client.post("/v1/rollouts", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert where in error_of(response)
