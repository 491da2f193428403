"""The retry policy: exponential backoff with full jitter (a fleet restarted together
must not retry in lock-step)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays between min_s and max_s seconds, doubling the cap with each attempt."""

    min_s: float = 0.5
    max_s: float = 60.0

    def delay(self, attempt: int) -> float:
        cap = min(self.max_s, self.min_s * (2 ** min(attempt, 32)))
        return random.uniform(self.min_s, max(self.min_s, cap))  # noqa: S311 - jitter, not a secret
