"""The download's background hasher: same digests as hashing inline, in order, and no thread left behind."""
from __future__ import annotations

import hashlib
import threading

import pytest

from edgefleet.agent.streamhash import QUEUE_CHUNKS, StreamHasher


def test_digests_match_inline_hashing_over_more_chunks_than_the_queue_holds():
    chunks = [bytes([i]) * (1000 + i) for i in range(QUEUE_CHUNKS * 3)]
    hasher = StreamHasher(["sha256", "sha512"])
    for chunk in chunks:
        hasher.update(chunk)
    assert hasher.hexdigests() == {"sha256": hashlib.sha256(b"".join(chunks)).hexdigest(),
                                   "sha512": hashlib.sha512(b"".join(chunks)).hexdigest()}


def test_close_ends_the_thread_and_an_unknown_algorithm_is_refused():
    before = threading.active_count()
    hasher = StreamHasher(["sha256"])
    hasher.update(b"x" * 10)
    hasher.close()
    hasher.close()  # twice is harmless (a failed download closes, then its context exits)
    assert threading.active_count() == before
    with pytest.raises(ValueError):
        StreamHasher(["no-such-hash"])
