"""Kubernetes-style label selectors over device labels and hardware profile fields.

``site=berlin,hw=jetson-orin``, ``env!=dev``, ``env in (a,b)``, ``env notin (a)``,
``gpu`` (key exists), ``!gpu`` (key absent). Keys starting with ``hw.`` read the
device's hardware profile: ``hw.arch``, ``hw.class``, ``hw.memory_mb``, and for the
list fields ``hw.cpu_features`` / ``hw.providers`` ``=`` means "contains".
"""
from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from edgefleet.common.hardware import HardwareProfile

from ..errors import InvalidInput

HW_PREFIX = "hw."
_TOKEN = re.compile(r"\s*(?:(?P<op>==|!=|=|!|\(|\)|,)|(?P<word>[A-Za-z0-9_./:-]+))")

FieldValue = str | tuple[str, ...]


class SelectorError(InvalidInput):
    """A selector that does not parse; the message names the position."""


class Op(str, enum.Enum):
    EQ = "="
    NE = "!="
    IN = "in"
    NOTIN = "notin"
    EXISTS = "exists"
    ABSENT = "!"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: tuple[str, ...] = ()

    def matches(self, fields: Mapping[str, FieldValue]) -> bool:
        value = fields.get(self.key)
        present = value is not None and value != ()
        if self.op is Op.EXISTS:
            return present
        if self.op is Op.ABSENT:
            return not present
        have = set(value) if isinstance(value, tuple) else ({value} if present else set())
        hit = bool(have & set(self.values))
        return hit if self.op in (Op.EQ, Op.IN) else not hit

    def __str__(self) -> str:
        if self.op is Op.EXISTS:
            return self.key
        if self.op is Op.ABSENT:
            return f"!{self.key}"
        if self.op in (Op.IN, Op.NOTIN):
            return f"{self.key} {self.op.value} ({','.join(self.values)})"
        return f"{self.key}{self.op.value}{self.values[0]}"


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        return cls(_Parser(text).parse())

    def matches(self, labels: Mapping[str, str], hardware: Mapping[str, Any] | None = None) -> bool:
        fields = device_fields(labels, hardware)
        return all(r.matches(fields) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(map(str, self.requirements))


def device_fields(labels: Mapping[str, str], hardware: Mapping[str, Any] | None) -> dict[str, FieldValue]:
    """The selectable fields of one device: its labels plus ``hw.*`` profile fields."""
    fields: dict[str, FieldValue] = {str(k): str(v) for k, v in labels.items()}
    hardware = dict(hardware or {})
    if hardware and "hardware_class" not in hardware:
        hardware["hardware_class"] = HardwareProfile.from_dict(hardware).hardware_class
    for key, value in hardware.items():
        name = HW_PREFIX + ("class" if key == "hardware_class" else key)
        if isinstance(value, dict):
            fields.update({f"{name}.{k}": str(v) for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            fields[name] = tuple(str(v) for v in value)
        elif value is not None and value != "":
            fields[name] = str(value)
    return fields


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []  # (kind, value, position)
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None or match.end() == pos:
                if text[pos:].strip() == "":
                    break
                self._fail(pos + len(text[pos:]) - len(text[pos:].lstrip()), "unexpected character")
            kind = "op" if match.group("op") else "word"
            self.tokens.append((kind, match.group(kind), match.start(kind)))
            pos = match.end()
        self.i = 0

    def parse(self) -> tuple[Requirement, ...]:
        if not self.tokens:
            return ()
        requirements = [self._requirement()]
        while self._peek() is not None:
            self._expect_op(",")
            requirements.append(self._requirement())
        return tuple(requirements)

    def _requirement(self) -> Requirement:
        if self._peek_op("!"):
            self.i += 1
            return Requirement(self._word("a key after '!'"), Op.ABSENT)
        key = self._word("a key")
        token = self._peek()
        if token is None or token[:2] == ("op", ","):
            return Requirement(key, Op.EXISTS)
        kind, value, pos = token
        self.i += 1
        if kind == "op" and value in ("=", "=="):
            return Requirement(key, Op.EQ, (self._word("a value"),))
        if kind == "op" and value == "!=":
            return Requirement(key, Op.NE, (self._word("a value"),))
        if kind == "word" and value in ("in", "notin"):
            return Requirement(key, Op(value), self._value_set())
        self._fail(pos, f"expected '=', '!=', 'in' or 'notin' after {key!r}, got {value!r}")

    def _value_set(self) -> tuple[str, ...]:
        self._expect_op("(")
        values = [self._word("a value")]
        while self._peek_op(","):
            self.i += 1
            values.append(self._word("a value"))
        self._expect_op(")")
        return tuple(values)

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _peek_op(self, op: str) -> bool:
        token = self._peek()
        return token is not None and token[:2] == ("op", op)

    def _word(self, what: str) -> str:
        token = self._peek()
        if token is None or token[0] != "word":
            self._fail(token[2] if token else len(self.text), f"expected {what}")
        self.i += 1
        return token[1]

    def _expect_op(self, op: str) -> None:
        if not self._peek_op(op):
            token = self._peek()
            self._fail(token[2] if token else len(self.text), f"expected {op!r}")
        self.i += 1

    def _fail(self, pos: int, message: str) -> NoReturn:
        raise SelectorError(f"selector {self.text!r}: {message} at position {pos + 1}")
