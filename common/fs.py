"""File-system helpers both sides use: the one atomic write, and bounded reads of small JSON files."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import StorageError

MAX_JSON_BYTES = 1024 * 1024  # our own small files, still bounded before parsing
TEMP_GLOB = ".*.tmp"  # what an interrupted atomic_write leaves behind

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

Writer = Callable[[BinaryIO, bytes], Any]


def storage_error(e: OSError, what: str) -> StorageError:
    """Translate a failed write into one line that says what to do."""
    if e.errno in _DISK_FULL:
        return StorageError(f"disk full while writing {what}: free space and retry")
    return StorageError(f"cannot write {what}: {e.strerror or e}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, writer: Writer | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, never half.

    ``writer(file, data)`` replaces the plain write (for example to stream an archive).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        # unique per writer, and 0600: state files hold credentials (keys, tokens, configs) or nothing others need
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        with open(fd, "wb") as f:
            (writer or type(f).write)(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException as e:  # whatever stops the write, no temp file stays behind
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise storage_error(e, str(path)) from e
        raise


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any | None:
    """One of our own small JSON files; missing, oversized or unreadable means absent."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(data) > max_bytes:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None
