"""The installed layout: namespaced packages, every folder listed, agent extras small."""
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_under_edgefleet():
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    # a folder of files only (the dashboard's) is listed so that its package-data ships
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    data_only = {name for name in listed - found if name in data and _folder(mapping, name).is_dir()}
    assert found | data_only == listed, f"pyproject packages out of date: missing {found - listed}, extra {listed - found}"
    assert all(p.startswith("edgefleet.") for p in listed)


def _folder(mapping: dict[str, str], package: str) -> Path:
    base = max((name for name in mapping if package.startswith(name + ".")), key=len)
    return REPO / mapping[base] / Path(*package.removeprefix(base + ".").split("."))


def test_agent_extra_pulls_nothing_of_the_controller():
    agent = " ".join(PYPROJECT["project"]["optional-dependencies"]["agent"]).lower()
    for heavy in ("sqlalchemy", "alembic", "boto3", "fastapi", "click", "onnx>"):
        assert heavy not in agent


def test_grpc_is_an_extra_a_rest_only_device_goes_without():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(dep.startswith(("grpcio", "protobuf")) for dep in extras["agent"])
    grpc = {dep.split(">")[0].split("[")[0] for dep in extras["grpc"]}
    assert {"grpcio", "protobuf", "edgefleet"} == grpc
    assert "edgefleet[controller,grpc]" in extras["dev"]  # the tests run tritonclient.grpc against it
