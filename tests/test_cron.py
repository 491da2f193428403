"""The cron of a maintenance window: full Vixie syntax, and one-line refusals naming the field."""
from datetime import datetime

import pytest

from edgefleet.agent.window import is_open
from edgefleet.common.cron import Cron
from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import Window

MONDAY = datetime(2026, 11, 23, 2, 0)
SATURDAY = datetime(2026, 11, 28, 2, 0)
SUNDAY = datetime(2026, 11, 29, 2, 0)


@pytest.mark.parametrize("expr, field, values", [
    ("*/15 * * * *", "minute", {0, 15, 30, 45}),
    ("1-10/2 * * * *", "minute", {1, 3, 5, 7, 9}),
    ("5/20 * * * *", "minute", {5, 25, 45}),
    ("1,2,40-42 * * * *", "minute", {1, 2, 40, 41, 42}),
    ("0 */6 * * *", "hour", {0, 6, 12, 18}),
    ("0 0 * JAN,jul *", "month", {1, 7}),
    ("0 0 * Mar-May *", "month", {3, 4, 5}),
    ("0 0 * * MON-FRI", "dow", {1, 2, 3, 4, 5}),
    ("0 0 * * sun,SAT", "dow", {0, 6}),
    ("0 0 * * mon-fri/2", "dow", {1, 3, 5}),
    ("0 0 * * 7", "dow", {0}),
    ("0 0 * * 5-7", "dow", {5, 6, 0}),
])
def test_syntax(expr, field, values):
    assert getattr(Cron.parse(expr), field) == frozenset(values)


def test_day_fields_follow_vixie():
    both = Cron.parse("0 0 1 * MON")  # the 1st OR a Monday
    assert both.matches(datetime(2026, 11, 23, 0, 0)) and both.matches(datetime(2026, 12, 1, 0, 0))
    assert not both.matches(datetime(2026, 11, 24, 0, 0))
    stepped = Cron.parse("0 0 1 * */2")  # a day field starting with '*' is unrestricted: both must match
    assert stepped.matches(datetime(2026, 12, 1, 0, 0))       # Tuesday the 1st (dow 2)
    assert not stepped.matches(datetime(2027, 1, 1, 0, 0))    # Friday the 1st (dow 5)
    assert not stepped.matches(SUNDAY.replace(hour=0))        # a Sunday (dow 0), not the 1st
    assert Cron.parse("0 0 29 2 *").month == {2}  # fires in leap years


@pytest.mark.parametrize("expr, message", [
    ("61 25 * * *", "minute 61 is out of range 0-59"),
    ("0 25 * * *", "hour 25 is out of range 0-23"),
    ("0 0 0 * *", "day-of-month 0 is out of range 1-31"),
    ("0 0 * 13 *", "month 13 is out of range 1-12"),
    ("0 0 * * 8", "day-of-week 8 is out of range 0-7"),
    ("1,,2 * * * *", "minute field has an empty list entry"),
    ("*/0 * * * *", "minute step '0' in '\\*/0' must be a whole number above 0"),
    ("*/x * * * *", "minute step 'x'"),
    ("5/ * * * *", "minute step ''"),
    ("5-1 * * * *", "minute range '5-1' is reversed"),
    ("0 0 * * FRI-MON", "day-of-week range 'FRI-MON' is reversed"),
    ("a * * * *", "minute 'a' is not a number 0-59"),
    ("² * * * *", "minute '²' is not a number"),
    ("0 0 * * FOO", "day-of-week 'FOO' is not a number 0-7 or a name SUN-SAT"),
    ("0 0 * MON *", "month 'MON' is not a number 1-12 or a name JAN-DEC"),
    ("0 0 30 2 *", "never fires: no day 30 exists in month 2"),
    ("0 0 31 APR,jun *", "never fires: no day 31 exists in month 4,6"),
    ("0 2 * *", "must have 5 fields"),
])
def test_refusals_are_one_line_naming_the_field(expr, message):
    with pytest.raises(ProtocolError, match=message) as info:
        Cron.parse(expr, field="--window")
    text = str(info.value)
    assert text.startswith(f"--window {expr!r}") and "\n" not in text


def test_the_wire_window_validates_with_the_same_parser():
    with pytest.raises(ProtocolError, match=r"^Window.cron '0 0 30 2 \*' never fires"):
        Window.from_dict({"cron": "0 0 30 2 *", "duration_s": 60})
    assert Window.from_dict({"cron": "0 2 * * MON-FRI", "duration_s": 60}).cron == "0 2 * * MON-FRI"


def test_agent_window_honours_names():
    weekdays = Window(cron="0 2 * * MON-FRI", duration_s=3600)
    assert is_open(weekdays, MONDAY) and is_open(weekdays, MONDAY.replace(minute=59))
    assert not is_open(weekdays, SATURDAY) and not is_open(weekdays, SUNDAY)
    weekend = Window(cron="0 2 * NOV sat,sun", duration_s=3600)
    assert is_open(weekend, SATURDAY) and is_open(weekend, SUNDAY) and not is_open(weekend, MONDAY)
    assert not is_open(weekend, SATURDAY.replace(month=12, day=5))
