"""The agent's TUF updater.

Metadata goes through python-tuf's ``ngclient.Updater`` (root rotation,
rollback, freeze and signature checks all live there). Target files go
through a resumable download of our own, because the device needs what
``Updater.download_target`` does not do: keep ``DEST.part`` between attempts,
resume with an HTTP Range, stop as soon as the server sends more than the
signed length, and only then verify every signed hash before ``os.replace``.

Errors leave here as the agent's own: ``VerificationError`` (the repository
sent something bad), ``UnknownTargetError``, ``TransportError`` (retry later),
``StorageError`` (local disk).
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import urllib3
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from edgefleet.common.errors import ProtocolError, StorageError
from edgefleet.common.fs import atomic_write, fsync_dir, storage_error
from edgefleet.common.protocol import TargetInfo, target_path

from .errors import TransportError, UnknownTargetError, VerificationError
from .streamhash import StreamHasher

TARGET_READ = 1024 * 1024  # reads of a download: fewer, larger hops through Python per byte
MAX_ROOT_BYTES = UpdaterConfig().root_max_length
USER_AGENT = "edgefleet-agent"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class RangeFetcher(FetcherInterface):
    """A python-tuf fetcher that can also resume a download from an offset."""

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """Return ``(start, chunks)``: the body begins at byte ``start``.

        ``start`` is ``offset`` when the server honoured the range and 0 when it
        sent the whole file. This default cannot ask for ranges.
        """
        return 0, self.fetch(url)


class HttpFetcher(RangeFetcher):
    """HTTP(S) with urllib3: connect and between-bytes timeouts, Range requests."""

    def __init__(self, timeout_s: float = 30.0, pool_size: int = 1):
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        # Redirects are followed (presigned store URLs); failed reads are not
        # retried here because the caller resumes from what it already has.
        retries = urllib3.Retry(total=3, connect=2, read=0, status=0, redirect=3, raise_on_status=False)
        # pool_size: connections kept per host, for a fetcher shared by many threads
        self._pool = urllib3.PoolManager(retries=retries, maxsize=pool_size, headers={"User-Agent": USER_AGENT})

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.fetch_from(url, 0)[1]

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = self._pool.request(
                "GET", url, headers=headers, preload_content=False, timeout=self._timeout
            )
        except urllib3.exceptions.MaxRetryError as e:
            # NewConnectionError subclasses ConnectTimeoutError: a refused connection is not slow
            reason = e.reason
            if isinstance(reason, urllib3.exceptions.TimeoutError) and not isinstance(
                reason, urllib3.exceptions.NewConnectionError
            ):
                raise exceptions.SlowRetrievalError(f"{url} timed out") from e
            raise exceptions.DownloadError(f"cannot reach {url}: {e.reason}") from e
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"cannot fetch {url}: {e}") from e
        if response.status >= 400:
            _discard(response)
            raise exceptions.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        start = 0
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None:
                _discard(response)
                raise exceptions.DownloadError(f"{url} answered 206 without a usable Content-Range")
            start = int(match.group(1))
        return start, self._chunks(url, response)

    @staticmethod
    def _chunks(url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        complete = False
        try:
            # read1 hands over whatever arrived, so a cut loses no received bytes
            while chunk := response.read1(TARGET_READ):
                yield chunk
            complete = True
        except urllib3.exceptions.TimeoutError as e:
            raise exceptions.SlowRetrievalError(f"{url} stalled") from e
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"{url} broke off mid-stream ({type(e).__name__})") from e
        finally:
            if complete:
                response.release_conn()
            else:  # the reader stopped early (e.g. a length cap)
                _discard(response)


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close a connection whose body was not read to the end before it goes back to the pool:
    urllib3 would hand it out again, and the next request would read the rest of this body
    as its answer (seen under load: a 404's body parsed as the next status line)."""
    response.close()
    response.release_conn()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# What each rejection means, most specific first (python-tuf's own messages follow).
_REJECTIONS: tuple[tuple[type[exceptions.RepositoryError], str], ...] = (
    (exceptions.ExpiredMetadataError, "expired metadata"),
    (exceptions.BadVersionNumberError, "metadata rollback"),
    (exceptions.UnsignedMetadataError, "bad or missing signatures"),
    (exceptions.LengthOrHashMismatchError, "metadata length or hash mismatch"),
    (exceptions.RepositoryError, "repository metadata rejected"),
)


@contextmanager
def tuf_errors(what: str) -> Iterator[None]:
    """Translate python-tuf's exceptions into the agent's, one line each."""
    try:
        yield
    except exceptions.DownloadLengthMismatchError as e:
        raise VerificationError(f"{what}: metadata larger than allowed ({_first_line(e)})") from e
    except exceptions.DownloadError as e:
        raise TransportError(f"{what}: {_first_line(e)}") from e
    except exceptions.RepositoryError as e:
        label = next(label for kind, label in _REJECTIONS if isinstance(e, kind))
        raise VerificationError(f"{what}: {label} ({_first_line(e)})") from e


@contextmanager
def _metadata_errors(what: str, metadata_dir: Path) -> Iterator[None]:
    """``tuf_errors`` plus the local metadata cache failing to read or write."""
    with tuf_errors(what):
        try:
            yield
        except OSError as e:
            raise StorageError(f"{what}: metadata in {metadata_dir} unusable ({e.strerror or e})") from e


def trust_root(metadata_dir: Path, root_bytes: bytes) -> None:
    """Bootstrap trust: make ``root_bytes`` the trusted root and drop every other cached metadata."""
    if len(root_bytes) > MAX_ROOT_BYTES:
        raise VerificationError(f"trusted root is {len(root_bytes)} bytes, above {MAX_ROOT_BYTES}")
    try:
        root = Metadata.from_bytes(root_bytes)
    except DeserializationError as e:
        raise VerificationError(f"trusted root is not TUF metadata: {_first_line(e)}") from e
    if not isinstance(root.signed, Root):
        raise VerificationError(f"trusted root is {root.signed.type} metadata, not root")
    metadata_dir = Path(metadata_dir)
    try:
        metadata_dir.mkdir(parents=True, exist_ok=True)
        for path in metadata_dir.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.suffix == ".json":
                path.unlink()
    except OSError as e:
        raise storage_error(e, str(metadata_dir)) from e
    atomic_write(metadata_dir / "root.json", root_bytes)


def check_release(info: TargetInfo, installed_release: int) -> None:
    """Refuse a release older than the installed one, even when validly signed."""
    if info.release < installed_release:
        raise VerificationError(
            f"{info.model} {info.version} has release {info.release}, older than installed "
            f"release {installed_release}; refusing to roll back"
        )


class ModelUpdater:
    """Refresh TUF metadata, look up signed targets and download them safely.

    ``metadata_dir`` must already hold a trusted root (see ``trust_root``).
    ``refresh()`` may be called again later: each call starts a new
    ``Updater``, as python-tuf refreshes once per instance.
    """

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        target_base_url: str = "",
        timeout_s: float = 30.0,
        fetcher: RangeFetcher | None = None,
    ):
        self.metadata_dir = Path(metadata_dir)
        self.metadata_url = metadata_url
        self.target_base_url = target_base_url.rstrip("/") + "/" if target_base_url else ""
        self._fetcher = fetcher or HttpFetcher(timeout_s)
        self._updater: Updater | None = None
        self._consistent_snapshot = True

    def refresh(self) -> None:
        if not (self.metadata_dir / "root.json").exists():
            raise StorageError(f"no trusted root in {self.metadata_dir}: enroll the device first")
        with _metadata_errors("TUF refresh", self.metadata_dir):
            updater = Updater(str(self.metadata_dir), self.metadata_url, fetcher=self._fetcher, bootstrap=None)
            updater.refresh()
            root = Metadata[Root].from_file(str(self.metadata_dir / "root.json"))
        self._consistent_snapshot = bool(root.signed.consistent_snapshot)
        self._updater = updater

    def target(self, path: str) -> TargetFile:
        """The signed target at ``path``; refreshes first if this updater has not."""
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        with _metadata_errors(f"TUF lookup of {path}", self.metadata_dir):
            target = self._updater.get_targetinfo(path)
        if target is None:
            raise UnknownTargetError(f"{path} is not signed by the repository; publish it first")
        return target

    def find(self, path: str) -> tuple[TargetFile, TargetInfo]:
        """A model target and its signed edgefleet fields, which must name the same path."""
        target = self.target(path)
        try:
            info = TargetInfo.from_custom(target.custom)
        except ProtocolError as e:
            raise VerificationError(f"target {path} has invalid edgefleet fields: {e}") from e
        if target_path(info.model, info.version, info.variant) != path:
            raise VerificationError(
                f"target {path} claims to be {info.model} {info.version} {info.variant}; refusing it"
            )
        return target, info

    def find_cached(self, target: TargetFile, dest: Path) -> bool:
        """True when ``dest`` already holds exactly the signed target."""
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater.find_cached_target(target, str(dest)) is not None

    def url(self, target: TargetFile) -> str:
        name = target.get_prefixed_paths()[0] if self._consistent_snapshot else target.path
        return self.target_base_url + name

    def download(self, target: TargetFile, dest: Path) -> Path:
        """Download ``target`` into ``dest``, resuming ``dest.part`` from an earlier attempt.

        On a verification failure the partial file is deleted and nothing is
        left at ``dest``; on a transport failure it is kept for the next try.
        """
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        url = self.url(target)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with _Partial(part, target) as partial:
                if partial.size < target.length:
                    self._fill(partial, url)
                partial.verify()
            os.replace(part, dest)
            fsync_dir(dest.parent)
        except VerificationError:
            part.unlink(missing_ok=True)
            raise
        except TransportError:
            if part.exists() and part.stat().st_size == 0:
                part.unlink()  # nothing arrived: no progress worth keeping
            raise
        except OSError as e:
            part.unlink(missing_ok=True)  # gives a full disk its space back
            raise storage_error(e, str(dest)) from e
        return dest

    def _fill(self, partial: _Partial, url: str) -> None:
        with tuf_errors(f"download of {partial.target.path}"):
            try:
                start, chunks = self._fetcher.fetch_from(url, partial.size)
            except exceptions.DownloadHTTPError as e:
                if e.status_code != 416 or not partial.size:
                    raise
                partial.restart()  # our partial file no longer fits the server's
                start, chunks = self._fetcher.fetch_from(url, 0)
            if start != partial.size:
                if start != 0:
                    raise exceptions.DownloadError(f"{url} resumed at byte {start}, not {partial.size}")
                partial.restart()  # the server ignored the Range: take the whole body
            for chunk in chunks:
                partial.write(chunk)


class _Partial:
    """``DEST.part``: appends while hashing and refuses bytes beyond the signed length."""

    def __init__(self, path: Path, target: TargetFile):
        self.path = path
        self.target = target
        self.size = 0
        self._file: BinaryIO | None = None
        self._hasher: StreamHasher | None = None

    def __enter__(self) -> _Partial:
        self._file = file = open(self.path, "a+b")
        self._reset_hashes()
        file.seek(0)
        if os.fstat(file.fileno()).st_size > self.target.length:
            self.restart()
        for block in iter(lambda: file.read(TARGET_READ), b""):
            self._update(block)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        if self._hasher is not None:
            self._hasher.close()
        self._file.close()

    def _reset_hashes(self) -> None:
        if self._hasher is not None:
            self._hasher.close()
        try:
            self._hasher = StreamHasher(list(self.target.hashes))
        except ValueError as e:
            raise VerificationError(f"{self.target.path} is signed with an unsupported hash: {e}") from e
        self.size = 0

    def _update(self, data: bytes) -> None:
        assert self._hasher is not None
        self._hasher.update(data)
        self.size += len(data)

    def restart(self) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self._reset_hashes()

    def write(self, chunk: bytes) -> None:
        assert self._file is not None
        if self.size + len(chunk) > self.target.length:
            raise VerificationError(
                f"{self.target.path} is longer than its signed length of {self.target.length} bytes"
            )
        self._file.write(chunk)
        self._update(chunk)

    def verify(self) -> None:
        assert self._file is not None
        if self.size < self.target.length:
            raise TransportError(
                f"download of {self.target.path} stopped at {self.size} of {self.target.length} bytes; "
                f"it resumes on the next attempt"
            )
        assert self._hasher is not None
        digests = self._hasher.hexdigests()
        for name, expected in self.target.hashes.items():
            if digests[name] != expected:
                raise VerificationError(f"{self.target.path} does not match its signed {name} hash")
        self._file.flush()
        os.fsync(self._file.fileno())

