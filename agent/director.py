"""Admitting signed desired states: the I/O around :class:`.trust.DirectorTrust`.

Trust comes from the TUF updater's verified cache (``<state_dir>/tuf``), read
again only when its targets.json or timestamp.json changes, and holds only until that
metadata expires: then the updater refreshes first. When an envelope is not signed by the
director keys known here, the metadata may be older than the message (a director
key rotation): the updater refreshes once, then the envelope is judged for good.
The newest accepted envelope is kept in ``<state_dir>/desired.json``: its
generation is the floor the next one must rise above, across restarts.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from securesystemslib.dsse import Envelope

from edgefleet.common import director
from edgefleet.common.errors import ProtocolError, StorageError
from edgefleet.common.fs import atomic_write, storage_error
from edgefleet.common.protocol import DesiredSet

from .errors import CommandRefused, NotSigned, RemoteError, TransportError, VerificationError
from .trust import Accepted, DirectorTrust

log = logging.getLogger(__name__)

ACCEPTED_FILE = "desired.json"
REFRESH_MIN_S = 5.0  # a refresh asked for by an unverifiable envelope, at most this often
RETRY_S = 15.0       # a refresh that failed in transport (or a full disk) is tried again after this


class Refresher(Protocol):
    def refresh(self) -> None: ...


class RefreshLater(TransportError):
    """The envelope needs newer TUF metadata than a refresh may fetch now; try again after ``after_s``."""

    def __init__(self, reason: str, after_s: float) -> None:
        super().__init__(reason)
        self.after_s = after_s


class Director:
    """Decides whether a desired state's bytes are obeyed (see the module docstring)."""

    def __init__(self, state_dir: Path, device: str, updater: Refresher,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.device = device
        self._now = now
        self._metadata_dir = Path(state_dir) / "tuf"
        self._path = Path(state_dir) / ACCEPTED_FILE
        self._updater = updater
        self._clock = clock
        self._trust: DirectorTrust | None = None
        self._stamp: tuple[tuple[int, int, int], ...] | None = None  # targets and timestamp files read
        self._attempted = -math.inf  # the last refresh tried (they are spaced REFRESH_MIN_S apart)
        self._refreshed = -math.inf  # the start of the last refresh that succeeded
        self._accepted = self._read_accepted()

    def admit(self, raw: bytes, received: float) -> DesiredSet:
        """The desired state ``raw`` carries, once verified; ``received`` is its arrival (clock time).

        Raises CommandRefused (for good) or RefreshLater (keep it, try again).
        """
        try:
            envelope = director.open_envelope(raw)
        except ProtocolError as e:
            raise NotSigned(str(e)) from None
        self._ensure_fresh()
        try:
            desired = self._judge(envelope)
        except NotSigned:
            if self._refreshed >= received:
                raise  # judged with metadata newer than the message
            self._refresh()
            desired = self._judge(envelope)
        accepted = Accepted.of(envelope, desired)
        if accepted != self._accepted:
            atomic_write(self._path, bytes(raw))
            self._accepted = accepted
        return desired

    def _ensure_fresh(self) -> None:
        """Refresh once when the cached metadata expired; while it stays expired, nothing is obeyed
        (a hostile or stale mirror can delay commands, never revive a revoked director key)."""
        trust = self._current_trust()
        if trust is None or trust.fresh_at(self._now()):
            return
        try:
            self._refresh()
        except VerificationError as e:  # e.g. the mirror serves expired metadata: it may be fixed
            raise RefreshLater(f"cannot refresh expired TUF metadata: {e}", RETRY_S) from e
        trust = self._current_trust()
        if trust is not None and not trust.fresh_at(self._now()):
            raise RefreshLater(f"trusted TUF metadata expired at {trust.fresh_until.isoformat()}; "
                               "waiting for the repository to sign fresh metadata", RETRY_S)

    def _judge(self, envelope: Envelope) -> DesiredSet:
        trust = self._current_trust()
        if trust is None:
            raise NotSigned("no trusted targets metadata yet")
        return trust.admit(envelope, self.device, self._accepted)

    def _refresh(self) -> None:
        started = self._clock()
        wait = self._attempted + REFRESH_MIN_S - started
        if wait > 0:
            raise RefreshLater("director keys may have rotated; TUF refresh due shortly", wait)
        self._attempted = started
        self._updater.refresh()  # TransportError: the envelope is kept for the next pass
        self._refreshed = started  # only a refresh that worked judges an envelope for good

    def _current_trust(self) -> DirectorTrust | None:
        files = [self._metadata_dir / f"{role}.json" for role in ("root", "targets", "timestamp")]
        try:
            stats = [os.stat(path) for path in files[1:]]
        except FileNotFoundError:
            return None
        except OSError as e:
            raise storage_error(e, str(self._metadata_dir)) from e
        stamp = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)
        if stamp != self._stamp:
            try:
                self._trust = DirectorTrust.from_metadata(*(path.read_bytes() for path in files))
            except OSError as e:
                raise storage_error(e, str(self._metadata_dir)) from e
            self._stamp = stamp
        return self._trust

    def _read_accepted(self) -> Accepted | None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise storage_error(e, str(self._path)) from e
        try:
            envelope = director.open_envelope(raw)
            return Accepted.of(envelope, DesiredSet.from_json(envelope.payload))
        except ProtocolError as e:  # written only whole (atomic_write): someone edited it
            log.warning("%s is unreadable (%s); any signed generation is accepted next", self._path, e)
            return None


class Inbox:
    """The desired state as the device holds it: the newest bytes received (from any thread),
    judged on the reconcile thread, and the newest admitted.

    A refusal is logged once per payload (the broker resends a retained state on every
    reconnect) and handed to ``refused(generation, deployment, reason)``: those the
    director signed for this device, else 0 and None.
    """

    def __init__(self, director: Director, refused: Callable[[int, str | None, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.director = director
        self._refused_cb = refused
        self._clock = clock
        self._lock = threading.Lock()
        self._received: tuple[bytes, float] | None = None
        self._desired: DesiredSet | None = None
        self._refused = b""  # digest of the last payload refused

    def put(self, raw: bytes) -> None:
        with self._lock:
            self._received = (raw, self._clock())

    def forget(self) -> None:
        """Memory is gone (a power cut): the retained state comes back on connect."""
        with self._lock:
            self._received, self._desired = None, None

    def take(self) -> tuple[DesiredSet | None, float | None]:
        """The desired state to act on, and seconds until a held envelope is judged again (None: nothing held)."""
        with self._lock:
            received, self._received = self._received, None
        if received is not None:
            try:
                desired = self.director.admit(*received)
            except (TransportError, StorageError) as e:  # no verdict yet: keep it, unless a newer one came
                with self._lock:
                    self._received = self._received or received
                return self._desired, e.after_s if isinstance(e, RefreshLater) else RETRY_S
            except RemoteError as e:
                self._refuse(received[0], e)
            else:
                with self._lock:
                    self._desired = desired
        return self._desired, None

    def _refuse(self, raw: bytes, error: RemoteError) -> None:
        digest = hashlib.sha256(raw).digest()
        if digest == self._refused:
            return
        self._refused = digest
        log.warning("refused a desired state: %s", error)
        if isinstance(error, CommandRefused):
            self._refused_cb(error.generation, error.deployment, str(error))
        else:
            self._refused_cb(0, None, str(error))
