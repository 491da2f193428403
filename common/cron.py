"""Five-field cron expressions (min hour dom mon dow), the one parser both sides use:
the controller refuses at deploy time what the agent could not parse."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .errors import ProtocolError

_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))  # dow 0 and 7 are both Sunday


def _field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = low, high
        elif "-" in base:
            start, end = (int(x) for x in base.split("-", 1))
        else:
            start = int(base)
            end = high if step_text else start
        if not (low <= start <= end <= high) or step < 1:
            raise ValueError(part)
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    minute: frozenset[int]
    hour: frozenset[int]
    dom: frozenset[int]
    month: frozenset[int]
    dow: frozenset[int]
    dom_any: bool
    dow_any: bool

    @classmethod
    def parse(cls, expr: str, field: str = "cron") -> Cron:
        """``field`` names the expression in the error (``Window.cron``, ``--window``)."""
        parts = expr.split()
        if len(parts) != 5:
            raise ProtocolError(f"{field} {expr!r} must have 5 fields (min hour dom mon dow)")
        try:
            sets = [_field(p, lo, hi) for p, (lo, hi) in zip(parts, _RANGES, strict=True)]
        except ValueError as e:
            raise ProtocolError(f"{field} {expr!r} has an invalid field {e}") from None
        minute, hour, dom, month, dow = sets
        return cls(minute, hour, dom, month, frozenset(d % 7 for d in dow), parts[2] == "*", parts[4] == "*")

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minute or t.hour not in self.hour or t.month not in self.month:
            return False
        dom_ok = t.day in self.dom
        dow_ok = (t.isoweekday() % 7) in self.dow
        # Vixie cron: when both day fields are restricted, either one matching is enough.
        if not self.dom_any and not self.dow_any:
            return dom_ok or dow_ok
        return dom_ok and dow_ok
