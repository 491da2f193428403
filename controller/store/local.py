"""Artifact store on a local directory (the embedded default)."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from stat import S_ISREG
from typing import IO

from edgefleet.common.errors import StorageError
from edgefleet.common.fs import TEMP_GLOB, atomic_write

from ..errors import NotFound, Unavailable
from . import ArtifactStore, check_key

CHUNK = 1024 * 1024


def read_range(f: IO[bytes], start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes ``start``..``end`` (inclusive; None: to the end) of an open file, a chunk at a time."""
    f.seek(start)
    remaining = None if end is None else end - start + 1
    while remaining is None or remaining > 0:
        chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


class LocalStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, fill: Callable[[IO[bytes]], object]) -> None:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, b"", lambda f, _: fill(f))
        except (OSError, StorageError) as e:
            raise Unavailable(f"cannot write {key} to local store {self.root}: {e}") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: Path) -> None:
        def copy(f: IO[bytes]) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK)

        self._write(key, copy)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key} is not in the store") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            stat = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a segment names a file
            raise NotFound(f"{key} is not in the store") from None
        if not S_ISREG(stat.st_mode):
            raise NotFound(f"{key} is not an object in the store")
        return stat.st_size

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            f = open(self.path(key), "rb")  # noqa: SIM115 - the with below; only open() means NotFound
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key} is not in the store") from None
        with f:
            yield from read_range(f, start, end)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.match(TEMP_GLOB)
        )

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
