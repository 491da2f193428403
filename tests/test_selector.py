"""Label selectors: Kubernetes syntax over labels and hardware fields; errors name the position."""
from __future__ import annotations

import pytest

from edgefleet.controller.errors import InvalidInput
from edgefleet.controller.rollout.selector import Selector, SelectorError

BERLIN_ORIN = ({"site": "berlin", "hw": "jetson-orin", "env": "prod"},
               {"arch": "aarch64", "hardware_class": "jetson-orin", "cpu_features": ["neon", "dotprod"],
                "providers": ["CPUExecutionProvider", "CUDAExecutionProvider"], "memory_mb": 8000,
                "jetson": {"module": "orin", "l4t": "36.3"}})
PARIS_X86 = ({"site": "paris", "env": "dev"}, {"arch": "x86_64", "cpu_features": ["avx2"], "memory_mb": 4000})


@pytest.mark.parametrize("text, berlin, paris", [
    ("site=berlin,hw=jetson-orin", True, False),
    ("site==berlin", True, False),
    ("site!=berlin", False, True),
    ("env in (prod, staging)", True, False),
    ("env notin (prod)", False, True),
    ("hw", True, False),
    ("!hw", False, True),
    ("hw.arch=x86_64", False, True),
    ("hw.class in (jetson-orin,rpi-4)", True, False),
    ("hw.class=x86_64", False, True),               # computed from the profile when absent
    ("hw.cpu_features=avx2", False, True),          # list fields: '=' means contains
    ("hw.providers=CUDAExecutionProvider", True, False),
    ("hw.jetson.module=orin", True, False),
    ("", True, True),
    ("site in (berlin,paris),!gpu", True, True),
])
def test_matches(text, berlin, paris):
    selector = Selector.parse(text)
    assert selector.matches(*BERLIN_ORIN) is berlin
    assert selector.matches(*PARIS_X86) is paris


def test_round_trips_to_canonical_text():
    selector = Selector.parse(" env in ( a , b ) , ! gpu , site == x ")
    assert str(selector) == "env in (a,b),!gpu,site=x"
    assert Selector.parse(str(selector)) == selector


@pytest.mark.parametrize("text, position, what", [
    ("site=", 6, "expected a value"),
    ("site=berlin,", 13, "expected a key"),
    ("env in (a,b", 12, "expected ')'"),
    ("env in a", 8, "expected '('"),
    ("site berlin", 6, "expected '=', '!=', 'in' or 'notin'"),
    ("site=ber@lin", 9, "unexpected character"),
    ("=x", 1, "expected a key"),
    ("a=b c=d", 5, "expected ','"),
])
def test_parse_errors_name_the_position(text, position, what):
    with pytest.raises(SelectorError) as info:
        Selector.parse(text)
    message = str(info.value)
    assert isinstance(info.value, InvalidInput)
    assert what in message and f"at position {position}" in message
    assert "\n" not in message
