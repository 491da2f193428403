"""What a device can claim in one message: bounds that hold whatever the broker let through.

A device's own credentials let it publish only on its own topics, but what it says
there is still only a claim. Ingest drops (and counts) a message that claims more
than a device can: a boot far past its last one (which would make every later
genuine message look stale), numbers past the database's 32-bit columns, and
negative or huge counters.
"""
from __future__ import annotations

from edgefleet.common.protocol import CounterSnapshot, DeviceMessage, Heartbeat, Message, Reported, Telemetry

MAX_BOOT_STEP = 1000      # agent restarts between two messages the controller sees; more is a forged boot
MAX_INT = 2**31 - 1       # boot, seq and generation columns are 32-bit
MAX_COUNT = 2**53         # counters stay exact as JSON numbers


def refusal(device_boot: int, message: DeviceMessage) -> str | None:
    """Why ``message`` claims more than a device whose last boot is ``device_boot`` can, or None."""
    boot, seq = getattr(message, "boot", 0), getattr(message, "seq", 0)
    if max(boot, seq, *_generations(message)) > MAX_INT:
        return f"boot, seq or generation above {MAX_INT}"
    if device_boot and boot > device_boot + MAX_BOOT_STEP:  # boot 0: never seen, any boot is its first
        return f"boot {boot} jumps more than {MAX_BOOT_STEP} past {device_boot}"
    if isinstance(message, Telemetry) and not all(0 <= n <= MAX_COUNT for n in _counts(message.payload)):
        return f"a counter is negative or above {MAX_COUNT}"
    if isinstance(message, Reported) and any((m.memory_kb or 0) > MAX_COUNT for m in message.models):
        return f"a model's memory_kb is above {MAX_COUNT}"
    return None


def _generations(message: DeviceMessage) -> list[int]:
    """The generations a message names: an event's, or each model's in a report."""
    if isinstance(message, Reported):
        return [m.generation for m in message.models]
    return [getattr(message, "generation", 0)]


def _counts(payload: Message) -> list[int]:
    if isinstance(payload, Heartbeat):
        extra = [payload.samples_pending, payload.samples_dropped, payload.rss_kb or 0]
        return extra + _counts(payload.counters)
    if isinstance(payload, CounterSnapshot):
        return [payload.requests, payload.rejected, payload.failures, *payload.latency_counts]
    return []
