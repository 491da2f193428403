"""The controller's director: signs every desired state it publishes (see :mod:`edgefleet.common.director`)."""
from __future__ import annotations

import os
import threading

from securesystemslib.signer import CryptoSigner

from edgefleet.common import director
from edgefleet.common.protocol import DesiredSet

from .errors import SigningError
from .signing import Repository


class DirectorSigner:
    """Seals desired states with the director keys the fleet's targets metadata delegates to.

    The keys are looked up again whenever HOME/keys changes (``fleetctl keys rotate
    director`` in another process), else kept: a seal costs one stat and the signatures.
    """

    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        self._lock = threading.Lock()
        self._signers: list[CryptoSigner] = []
        self._seen: int | None = None  # mtime of HOME/keys when the signers were loaded
        self._load()  # refuse to start without a director key

    def _load(self) -> list[CryptoSigner]:
        try:
            changed = os.stat(self._repository.keyring.directory).st_mtime_ns
        except OSError as e:
            raise SigningError(f"cannot read {self._repository.keyring.directory}: {e.strerror}") from e
        with self._lock:
            if changed != self._seen:
                self._signers = self._repository.director_signers()
                self._seen = changed
            return self._signers

    def seal(self, desired: DesiredSet) -> bytes:
        """The bytes to publish on the device's desired topic."""
        return director.seal(desired, self._load())
