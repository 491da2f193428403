"""The architecture's import rules, enforced: ``common`` is the only code both sides share.

Each installed package may import edgefleet packages only as its allowlist says, and the
code a device runs (agent and common) only the third-party packages of the agent extra.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# folder -> the edgefleet packages its modules may import
ALLOWED = {
    "common": {"edgefleet.common"},
    "agent": {"edgefleet.common", "edgefleet.agent"},
    "controller": {"edgefleet.common", "edgefleet.controller", "edgefleet.migrations"},
    "migrations": {"edgefleet.migrations", "edgefleet.controller.db.session"},  # the engine, never live models
    # the simulator runs real agents, and enrolls them as an operator would (the API client)
    "simulator": {"edgefleet.common", "edgefleet.agent", "edgefleet.simulator",
                  "edgefleet.controller.cli.client", "edgefleet.controller.config"},
}
PACKAGE_OF = {folder: f"edgefleet.{folder}" for folder in ALLOWED}

# What the device's code may import beyond the standard library: the agent extra's packages.
DEVICE_THIRD_PARTY = {"numpy", "paho", "onnxruntime", "tuf", "securesystemslib", "cryptography", "urllib3",
                      "prometheus_client"}
# The optional grpc extra (grpcio, protobuf): only the gRPC front end and its generated messages use it,
# so a device installed without the extra never imports it.
GRPC_EXTRA = {"grpc", "google"}
GRPC_MODULES = ("agent/grpc_serve.py", "agent/_proto/")


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in one module, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = package.split(".") + list(path.parent.relative_to(REPO / path.relative_to(REPO).parts[0]).parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def edgefleet_imports(folder: str) -> list[tuple[str, int, str]]:
    return [
        (str(path.relative_to(REPO)), line, module)
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, module in imports(path, PACKAGE_OF[folder])
    ]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_packages_import_only_what_their_allowlist_names(folder):
    allowed = ALLOWED[folder]
    offenders = [
        f"{path}:{line} imports {module}"
        for path, line, module in edgefleet_imports(folder)
        if module.startswith("edgefleet") and not any(module == a or module.startswith(a + ".") for a in allowed)
    ]
    assert offenders == [], "\n".join(offenders)


@pytest.mark.parametrize("folder", ["common", "agent"])
def test_device_code_imports_only_the_agent_extra(folder):
    offenders = [
        f"{path}:{line} imports {module}"
        for path, line, module in edgefleet_imports(folder)
        if not module.startswith("edgefleet")
        and module.split(".")[0] not in sys.stdlib_module_names | DEVICE_THIRD_PARTY
        and not (module.split(".")[0] in GRPC_EXTRA and path.startswith(GRPC_MODULES))
    ]
    assert offenders == [], "\n".join(offenders)


def test_a_rest_only_agent_never_loads_grpc():
    """The daemon and `fleet-agent serve` import the gRPC front end only when asked to serve gRPC."""
    code = ("import sys, edgefleet.agent.cli, edgefleet.agent.daemon, edgefleet.agent.serve; "
            "print(sorted(m for m in ('grpc', 'google.protobuf') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a controller import in agent code is caught."""
    fake_repo = tmp_path
    (fake_repo / "agent").mkdir()
    (fake_repo / "agent" / "bad.py").write_text("from edgefleet.controller.db import models\nimport sqlalchemy\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake_repo)
    found = {module for _path, _line, module in edgefleet_imports("agent")}
    assert found == {"edgefleet.controller.db", "sqlalchemy"}
    with pytest.raises(AssertionError, match=r"edgefleet.controller.db"):
        test_packages_import_only_what_their_allowlist_names("agent")
    with pytest.raises(AssertionError, match="sqlalchemy"):
        test_device_code_imports_only_the_agent_extra("agent")
