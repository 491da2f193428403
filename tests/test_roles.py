"""Operator roles through the API (every route) and through fleetctl: a viewer reads, a deployer
also publishes and rolls out, an admin also manages devices and tokens; every change is audited
with the name of the token that made it."""
from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.routing import APIRoute

from edgefleet.controller.api.app import ROUTERS
from edgefleet.controller.cli import main
from edgefleet.controller.db.models import AuditEntry, Device, Rollout
from tests.rollout_fleet import seed
from tests.support.api_server import running_controller

# The role each operator route needs: a route missing here fails the test, so none is left unguarded.
NEEDS = {
    ("GET", "/v1/devices"): "viewer",
    ("GET", "/v1/devices/{device_id}"): "viewer",
    ("GET", "/v1/devices/{device_id}/events"): "viewer",
    ("PATCH", "/v1/devices/{device_id}/labels"): "admin",
    ("DELETE", "/v1/devices/{device_id}"): "admin",
    ("POST", "/v1/devices/{device_id}/enroll-token"): "admin",
    ("GET", "/v1/models"): "viewer",
    ("GET", "/v1/models/{name}"): "viewer",
    ("GET", "/v1/models/{name}/{version}/frontier"): "viewer",
    ("POST", "/v1/models/sync"): "deployer",
    ("POST", "/v1/rollouts"): "deployer",
    ("GET", "/v1/rollouts"): "viewer",
    ("GET", "/v1/rollouts/{rollout_id}"): "viewer",
    ("POST", "/v1/rollouts/{rollout_id}/{action}"): "deployer",
    ("GET", "/v1/data/samples"): "viewer",
    ("GET", "/v1/data/samples/{sample_id}"): "viewer",
    ("GET", "/v1/data/stats"): "viewer",
    ("GET", "/v1/audit"): "viewer",
    ("GET", "/v1/tokens"): "admin",
    ("POST", "/v1/tokens"): "admin",
    ("DELETE", "/v1/tokens/{name}"): "admin",
    ("GET", "/metrics"): "viewer",
    ("GET", "/v1/whoami"): "viewer",
    ("GET", "/v1/fleet"): "viewer",
    ("GET", "/v1/rollouts/{rollout_id}/live"): "viewer",
    ("GET", "/v1/devices/{device_id}/trends"): "viewer",
}
# Not operator routes: public (the dashboard's and the API docs' files carry no data), or a device's own token.
OTHERS = {("GET", "/healthz"), ("GET", "/repository/{path:path}"), ("POST", "/v1/enroll"),
          ("POST", "/v1/devices/{device_id}/samples"), ("POST", "/v1/devices/{device_id}/certificate"),
          ("GET", "/"), ("GET", "/ui/"), ("GET", "/ui/static/{name}"), ("GET", "/docs")}
RANK = {"viewer": 0, "deployer": 1, "admin": 2}
VALUES = {"device_id": "de-1", "name": "nobody", "version": "1.0.0", "rollout_id": "r-none", "action": "pause", "sample_id": "1"}


def served_routes() -> set[tuple[str, str]]:
    routes = [route for router in ROUTERS for route in router.routes]
    assert all(isinstance(route, APIRoute) for route in routes)
    return {(method, route.path) for route in routes if isinstance(route, APIRoute) for method in route.methods}


@pytest.fixture
def api(tmp_path):
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}") as running:
        seed(running.db)
        yield running


def make_token(api, name: str, role: str) -> str:
    with api.client() as client:
        response = client.post("/v1/tokens", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    assert response.json()["role"] == role and response.json()["token"].startswith("efo_")
    return response.json()["token"]


def audit(api) -> list[tuple[str, str, str]]:
    with api.db.unit_of_work() as session:
        rows = session.execute(sa.select(AuditEntry.actor, AuditEntry.action, AuditEntry.target)
                               .order_by(AuditEntry.id))
        return [tuple(r) for r in rows]


def test_every_operator_route_declares_its_role():
    assert served_routes() == set(NEEDS) | OTHERS


@pytest.mark.parametrize("role", ["viewer", "deployer", "admin"])
def test_each_role_is_refused_exactly_the_routes_above_it(api, role):
    token = make_token(api, f"t-{role}", role)
    before = audit(api)
    with api.client(token=token) as client:
        for (method, template), needed in sorted(NEEDS.items()):
            path = re.sub(r"\{(\w+)\}", lambda m: VALUES[m.group(1)], template)
            response = client.request(method, path, json={} if method in ("POST", "PATCH") else None)
            if RANK[role] < RANK[needed]:
                assert response.status_code == 403, (role, method, path, response.text)
                error = response.json()["error"]
                assert f"token 't-{role}' has role {role}; {method} {path} needs {needed}" in error
                assert "\n" not in error
            else:
                assert response.status_code not in (401, 403), (role, method, path, response.text)
    if role != "admin":  # refused calls change and record nothing
        assert audit(api) == before
        with api.db.unit_of_work() as session:
            assert session.get(Device, "de-1") is None


def test_mutating_calls_are_audited_with_the_tokens_name(api):
    deployer, admin = make_token(api, "ci", "deployer"), make_token(api, "ops", "admin")
    with api.client(token=admin) as client:
        assert client.post("/v1/devices/pi-9/enroll-token", json={}).status_code == 201
        assert client.patch("/v1/devices/pi-9/labels", json={"set": {"site": "berlin"}}).status_code == 200
        assert client.delete("/v1/devices/pi-9").status_code == 204
    with api.client(token=deployer) as client:
        manifest = {"apiVersion": "edgefleet/v1", "kind": "Rollout", "metadata": {"name": "r1"},
                    "spec": {"model": "digits", "version": "1.1.0", "selector": "site=berlin",
                             "stages": ["100%"], "bake": "0s"}}
        response = client.post("/v1/rollouts", json={"manifest": manifest})
        assert response.status_code == 201, response.text
        assert client.post("/v1/rollouts/r1/pause").status_code == 200
    with api.client() as client:
        assert client.delete("/v1/tokens/ci").status_code == 204
    assert audit(api)[2:] == [  # after the two token.create entries of make_token
        ("operator:ops", "device.enroll-token", "pi-9"), ("operator:ops", "device.label", "pi-9"),
        ("operator:ops", "device.remove", "pi-9"), ("operator:ci", "rollout.create", "r1"),
        ("operator:ci", "rollout.pause", "r1"), ("operator:admin", "token.revoke", "ci"),
    ]
    assert audit(api)[:2] == [("operator:admin", "token.create", "ci"), ("operator:admin", "token.create", "ops")]
    with api.client(token=deployer) as client:  # revoked: refused at once
        assert client.get("/v1/rollouts").status_code == 401
    with api.db.unit_of_work() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Rollout)) == 1


def fleetctl(api, *args: str, token: str | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(main, [*args, "--controller", api.url, "--token", token or api.token])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result.stdout if code == 0 else result.stderr


def test_tokens_through_fleetctl(api):
    created = fleetctl(api, "tokens", "create", "ci", "--role", "deployer")
    secret = re.search(r"token\s*:?\s+(efo_\S+)", created)
    assert secret, created
    token = secret.group(1)
    assert re.search(r"^ci\s+deployer\s", fleetctl(api, "tokens", "list"), re.M)
    assert "efo_" not in fleetctl(api, "tokens", "list", "--format", "json")  # secrets are never listed
    # a deployer reads and rolls out, but does not administer devices or tokens
    assert "de-1" not in fleetctl(api, "devices", "list", token=token)
    refused = fleetctl(api, "devices", "enroll", "pi-7", token=token, code=1)
    assert refused.startswith("error: token 'ci' has role deployer; POST /v1/devices/pi-7/enroll-token needs admin")
    assert len(refused.splitlines()) == 1
    assert "needs admin" in fleetctl(api, "tokens", "list", token=token, code=1)
    assert "already named 'ci'" in fleetctl(api, "tokens", "create", "ci", "--role", "viewer", code=1)
    assert "'root' is not one of 'viewer', 'deployer', 'admin'" in fleetctl(
        api, "tokens", "create", "x", "--role", "root", code=2)
    with api.client() as client:  # the API itself refuses an unknown role or a bad name
        assert client.post("/v1/tokens", json={"name": "x", "role": "root"}).status_code == 400
        bad_name = client.post("/v1/tokens", json={"name": "a b", "role": "viewer"})
        assert bad_name.status_code == 400 and "token name 'a b' is invalid" in bad_name.json()["error"]
    assert fleetctl(api, "tokens", "revoke", "ci").strip() == "revoked token ci"
    assert "operator token is not valid" in fleetctl(api, "devices", "list", token=token, code=1)
    assert "no live operator token is named 'ci'" in fleetctl(api, "tokens", "revoke", "ci", code=1)
    assert "last admin token" in fleetctl(api, "tokens", "revoke", "admin", code=1)
