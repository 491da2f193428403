"""JSON from untrusted bytes, its nesting bounded before the parser recurses.

``json.loads`` recurses once per ``[``/``{``: a payload nested deeper than the
interpreter's recursion limit raises RecursionError (not ValueError) from inside
the parser, which callers that catch ValueError let through. :func:`loads` scans
the nesting first, at C speed, and raises :class:`JSONNestingError` (a ValueError)
for anything deeper than the caller's bound.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .errors import EdgefleetError

MAX_DEPTH = 32  # deeper than any message or request edgefleet speaks

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONNestingError(EdgefleetError, ValueError):
    """A JSON document nested deeper than its reader allows, or with unbalanced brackets."""


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONNestingError unless every bracket outside strings closes within ``max_depth`` levels."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # too few brackets to nest deeper (an unbalanced document fails json.loads instead)
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    # Each pass removes the innermost level; valid JSON empties within its depth.
    for _ in range(max_depth):
        if not brackets:
            return
        shorter = brackets.replace("[]", "").replace("{}", "")
        if len(shorter) == len(brackets):
            raise JSONNestingError("JSON brackets do not balance")
        brackets = shorter
    if brackets:
        raise JSONNestingError(f"JSON is nested deeper than {max_depth} levels")


def loads(payload: bytes | bytearray | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises ValueError (never RecursionError) on a deep or malformed document."""
    text = payload.decode(json.detect_encoding(payload)) if isinstance(payload, bytes | bytearray) else payload
    check_depth(text, max_depth)
    try:
        return json.loads(text)
    except RecursionError:  # a deeper bound than the interpreter's stack allows here
        raise JSONNestingError(f"JSON is nested too deep to parse (bound {max_depth})") from None
