"""Maintenance windows: a cron opens a window of ``duration_s``, evaluated in the device's local time."""
from __future__ import annotations

from datetime import datetime, timedelta

from edgefleet.common.cron import Cron
from edgefleet.common.protocol import Window

_MAX_LOOKBACK_MIN = 7 * 24 * 60  # a window longer than a week is open whenever its cron fired this week


def is_open(window: Window | None, now: datetime | None = None) -> bool:
    """True when no window is set, or a cron firing within the last ``duration_s`` opened it."""
    if window is None:
        return True
    cron = Cron.parse(window.cron)
    now = (now or datetime.now().astimezone()).replace(second=0, microsecond=0)
    minutes = min(window.duration_s // 60, _MAX_LOOKBACK_MIN)
    return any(cron.matches(now - timedelta(minutes=m)) for m in range(minutes + 1))
