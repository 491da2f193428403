"""``fleetctl keys``: the TUF signing keys of the fleet repository."""
from __future__ import annotations

from dataclasses import asdict

import click

from edgefleet.common import director

from ..config import ControllerConfig
from ..errors import SigningError
from ..home import is_initialized
from ..signing import ROLES, Repository
from ._output import emit, format_option


def _repository() -> Repository:
    config = ControllerConfig.load()
    if not is_initialized(config.home):
        raise SigningError(f"{config.home} is not a fleet home: run `fleetctl init` first")
    return Repository.from_config(config)


@click.group("keys")
def cli() -> None:
    """TUF signing keys (root, targets, snapshot, timestamp, and director, which signs desired states).

    \b
    Example:
      fleetctl keys list
      fleetctl keys rotate targets
      fleetctl keys rotate director
    """


@cli.command("list")
@format_option
def list_keys(fmt: str) -> None:
    """Keys the current root lists per role, and where their private halves are."""
    rows = [asdict(key) | {"path": key.path or "(not in HOME/keys)"} for key in _repository().keys()]
    emit(rows, fmt, ["role", "keyid", "threshold", "path"])


@cli.command("rotate")
@click.argument("role", type=click.Choice((*ROLES, director.ROLE)))
def rotate(role: str) -> None:
    """Replace ROLE's key(s) through a new signed root version (director: a new targets version).

    Devices follow the rotation on their next refresh: the new root is signed
    by the old root keys and the new ones. A fleet home made before desired
    states were signed gets its director key this way; the controller refuses
    to start without one.
    """
    repository = _repository()
    new = repository.rotate_key(role)
    where = "targets delegation" if role == director.ROLE else f"root version {repository.root_version()}"
    click.echo(
        f"rotated {role}: new key {', '.join(k[:16] for k in new)}; {where}; old key (if any) moved to keys/retired/"
    )
