"""Hash a download on a thread of its own while the caller receives and writes it.

OpenSSL's SHA-256 releases the GIL, so on a device with two cores the hash of
a target overlaps its transfer instead of adding to it (measured in
bench/verify.py: hashing inline made a 100 MB download+verify take the time of
the transfer plus the hash).
"""
from __future__ import annotations

import hashlib
import queue
import threading

QUEUE_CHUNKS = 16  # chunks waiting for the hash at most: bounds the memory a fast transfer can pile up


class StreamHasher:
    """Feeds ``update`` calls, in order, to one hash object per algorithm on a background thread."""

    def __init__(self, algorithms: list[str]) -> None:
        self._hashes = {name: hashlib.new(name) for name in algorithms}  # ValueError: unknown algorithm
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, name="stream-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            for h in self._hashes.values():
                h.update(data)

    def update(self, data: bytes) -> None:
        """Queue ``data`` (immutable: the thread reads it later); blocks while the queue is full."""
        self._queue.put(data)

    def hexdigests(self) -> dict[str, str]:
        """Every queued byte hashed; the hasher is closed."""
        self.close()
        return {name: h.hexdigest() for name, h in self._hashes.items()}

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
