"""The fleet home ($EDGEFLEET_HOME, else ~/.edgefleet): config, signing keys, local store.

``init_home`` is what ``fleetctl init`` does before the API helper adds its
own pieces (operator token, database).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import fields
from pathlib import Path

from edgefleet.common.errors import StorageError
from edgefleet.common.fs import atomic_write
from edgefleet.common.settings import toml_value

from .config import ControllerConfig, StoreConfig
from .errors import Conflict, Unavailable
from .pki import FleetCA
from .signing import REPOSITORY_PREFIX, Expiry, Repository
from .store import open_store

CONFIG_HEADER = """\
# edgefleet controller configuration. Every key is optional: the commented
# values are the defaults. Uncomment and edit to change one. EDGEFLEET_<KEY>
# in the environment beats this file ([store] keys: EDGEFLEET_STORE_<KEY>).
"""


def config_template() -> str:
    """config.toml with every key commented out at its default."""
    defaults = ControllerConfig(home=Path("HOME"))
    lines = [CONFIG_HEADER]
    for f in fields(ControllerConfig):
        if f.name not in ("home", "store"):
            lines.append(f"# {f.name} = {toml_value(getattr(defaults, f.name))}")
    lines += ["", "# [store]  # kind: \"local\" (a directory, default HOME/store) or \"s3\""]
    for f in fields(StoreConfig):
        lines.append(f"# {f.name} = {toml_value(getattr(defaults.store, f.name))}")
    return "\n".join(lines) + "\n"


def is_initialized(home: Path) -> bool:
    return (home / "keys").exists()


def init_home(home: Path, root_threshold: int = 1, root_keys: int = 1, force: bool = False) -> ControllerConfig:
    """Create a fleet home: config.toml, TUF keys, initial metadata in the configured store, the fleet CA.

    An existing config.toml without keys is used as it is, so a home can name its
    database and store before it is initialized.

    With ``force`` an existing home's config, keys and repository metadata are
    replaced (the old config is kept as config.toml.bak); devices enrolled
    against the old root must be enrolled again. The fleet CA (HOME/ca) is
    created once and kept.
    """
    home = Path(home)
    if is_initialized(home) and not force:
        raise Conflict(f"{home} is already a fleet home; use `fleetctl init --force` to replace its keys and metadata")
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.chmod(0o700)  # keys, the operator token and the database: owner only, whatever the umask
        config_path = home / "config.toml"
        if force and config_path.exists():
            os.replace(config_path, home / "config.toml.bak")
        if force:
            shutil.rmtree(home / "keys", ignore_errors=True)
        if not config_path.exists():  # a config written first (PostgreSQL, S3) is kept
            atomic_write(config_path, config_template().encode())
    except (OSError, StorageError) as e:
        raise Unavailable(f"cannot create fleet home {home}: {e}") from e
    config = ControllerConfig.load(home)
    store = open_store(config)
    if force:
        for key in store.list(REPOSITORY_PREFIX):
            store.delete(key)
    Repository.create(home, store, root_threshold, root_keys, Expiry.from_config(config))
    FleetCA.ensure(home)  # kept by --force: the broker's and devices' certificates stay valid
    return config

