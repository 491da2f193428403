"""``fleetctl apply -f rollout.yaml``: a rollout declared as a manifest."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import InvalidInput
from ..rollout.spec import MAX_MANIFEST_BYTES, RolloutSpec, load_manifest
from ._output import format_option
from .client import ApiClient, api_command
from .deploy import submit


@click.command(name="apply")
@click.option("-f", "--filename", "path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Rollout manifest (YAML or JSON; schema: manifests/rollout.schema.json).")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@format_option
@api_command
def cli(client: ApiClient, path: Path, dry_run: bool, fmt: str) -> None:
    """Create the rollout a manifest declares (validated here and by the controller).

    \b
    Example:
      fleetctl apply -f manifests/rollout.yaml --dry-run
    """
    try:
        with path.open("rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror}") from None
    manifest = load_manifest(text, str(path))
    RolloutSpec.from_manifest(manifest, str(path))  # report bad fields with their path before sending
    submit(client, manifest, dry_run, fmt)
