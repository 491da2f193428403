"""Five-field cron expressions (minute hour day-of-month month day-of-week), Vixie-cron syntax:
``*``, lists, ranges, steps (``*/15``, ``1-10/2``, ``5/10``), month names JAN-DEC and day names
SUN-SAT (any case, also in ranges), 0 and 7 both Sunday. The one parser both sides use: the
controller refuses at deploy time what the agent could not parse."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .errors import ProtocolError

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # Feb 29: fires in leap years


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i

    def parse(self, text: str) -> frozenset[int]:
        values: set[int] = set()
        for part in text.split(","):
            values.update(self._part(part))
        return frozenset(values)

    def _part(self, part: str) -> range:
        if not part:
            raise ValueError(f"{self.name} field has an empty list entry (write e.g. 1,15)")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not _is_number(step_text) or int(step_text) == 0:
                raise ValueError(f"{self.name} step {step_text!r} in {part!r} must be a whole number above 0")
            step = int(step_text)
        if base == "*":
            start, end = self.low, self.high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = self._value(first, part), self._value(last, part)
            if start > end:
                raise ValueError(f"{self.name} range {base!r} is reversed: write the lower value first")
        else:
            start = self._value(base, part)
            end = self.high if slash else start  # "5/10" runs from 5 to the end of the range
        return range(start, end + 1, step)

    def _value(self, text: str, part: str) -> int:
        if text.upper() in self.names:
            return self.low + self.names.index(text.upper())
        if not _is_number(text):
            names = f" or a name {self.names[0]}-{self.names[-1]}" if self.names else ""
            where = f" in {part!r}" if text != part else ""
            raise ValueError(f"{self.name} {text!r}{where} is not a number {self.low}-{self.high}{names}")
        value = int(text)
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name} {value} is out of range {self.low}-{self.high}")
        return value


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, _MONTHS),
    _Field("day-of-week", 0, 7, _DAYS),  # 7 is Sunday too, by number only
)


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
        """``field`` names the expression in the error (``Window.cron``, ``--window``, a manifest path)."""
        parts = expr.split()
        if len(parts) != 5:
            raise ProtocolError(
                f"{field} {expr!r} must have 5 fields (minute hour day-of-month month day-of-week), "
                f"e.g. '0 2 * * MON-FRI'"
            )
        try:
            minute, hour, dom, month, dow = (f.parse(p) for f, p in zip(_FIELDS, parts, strict=True))
        except ValueError as e:
            raise ProtocolError(f"{field} {expr!r}: {e}") from None
        # Vixie cron: a day field starting with '*' is unrestricted (then both day fields must match)
        cron = cls(minute, hour, dom, month, frozenset(d % 7 for d in dow),
                   dom_any=parts[2].startswith("*"), dow_any=parts[4].startswith("*"))
        if not cron._can_fire():
            raise ProtocolError(
                f"{field} {expr!r} never fires: no day {_list(cron.dom)} exists in month {_list(cron.month)}"
            )
        return cron

    def _can_fire(self) -> bool:
        if self.dom_any or not self.dow_any:  # every day, or day-of-month OR day-of-week: some day always comes
            return True
        return any(day <= _DAYS_IN_MONTH[month - 1] for month in self.month for day in self.dom)

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minute or t.hour not in self.hour or t.month not in self.month:
            return False
        dom_ok = t.day in self.dom
        dow_ok = (t.isoweekday() % 7) in self.dow
        # Vixie cron: when both day fields are restricted, either one matching is enough.
        if not self.dom_any and not self.dow_any:
            return dom_ok or dow_ok
        return dom_ok and dow_ok


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # not "²": int() refuses what str.isdigit() accepts


def _list(values: frozenset[int]) -> str:
    return ",".join(str(v) for v in sorted(values))
