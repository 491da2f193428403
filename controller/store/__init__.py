"""The artifact store: TUF metadata, targets and uploaded samples.

One narrow interface, two backends: a local directory (default) and S3.
Keys are '/'-separated relative paths such as ``repository/metadata/timestamp.json``.
"""
from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..config import ControllerConfig
from ..errors import NotFound

REPOSITORY_PREFIX = "repository"
SAMPLES_PREFIX = "samples"


class ArtifactStore(abc.ABC):
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raise NotFound when absent, Unavailable when the store cannot be reached."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes [start, end] inclusive (HTTP Range semantics)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    def download_url(self, key: str) -> str | None:
        """A URL devices can fetch directly (presigned), or None to stream via the API."""
        return None

    def download_to(self, key: str, dest: BinaryIO) -> None:
        for chunk in self.open_range(key):
            dest.write(chunk)


MAX_KEY_CHARS = 1024
MAX_SEGMENT_BYTES = 255  # a file name on the local store's file systems
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_key(key: str) -> str:
    """The key, if it can name an object: relative, no empty/./.. segments, no control characters
    (a NUL reached the file system as ValueError), bounded lengths; else NotFound."""
    parts = key.split("/")
    if (not key or len(key) > MAX_KEY_CHARS or key.startswith("/") or _CONTROL.search(key)
            or any(p in ("", ".", "..") or len(p.encode()) > MAX_SEGMENT_BYTES for p in parts)):
        shown = key if len(key) <= 80 else f"{key[:80]}..."
        raise NotFound(f"invalid object key {shown!r}")
    return key


def open_store(config: ControllerConfig) -> ArtifactStore:
    if config.store.kind == "local":
        from .local import LocalStore

        return LocalStore(config.store_path)
    if config.store.kind == "s3":
        from .s3 import S3Store

        return S3Store(config.store)
    from ..errors import InvalidInput

    raise InvalidInput(f"store kind {config.store.kind!r} is unknown: use 'local' or 's3'")
