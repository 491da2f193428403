"""Typed JSON objects: frozen dataclasses that parse and check themselves from their type hints.

One decoder for both sides. A field's resolved type (``typing.get_type_hints``) says
what JSON it takes: ``str``, ``int`` (a boolean is not one), ``float`` (an integer
is accepted), ``bool``, ``X | None``, an enum (the JSON holds one of its values),
a nested :class:`Record`, ``tuple[X, ...]``, ``list[X]`` and ``dict[str, X]``.
msgspec or pydantic would do the same, but neither fits the agent's footprint budget
with wheels for armv7l, so this is the plain-Python version of it.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, Self, cast

from .errors import ProtocolError

# Turns one parsed JSON value into a field value; the string names the value in errors.
Decoder = Callable[[Any, str], Any]


@dataclasses.dataclass(frozen=True)
class Record:
    """A strict JSON object: unknown fields, missing required fields and wrong types raise
    :class:`ProtocolError` naming ``Class.field``."""

    def to_dict(self) -> dict[str, Any]:
        return {name: encode(getattr(self, name)) for name in _field_names(type(self))}

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        decode = _DECODERS.get(cls) or _compile(cls)
        return cast(Self, decode(data))

    def validate(self) -> None:
        """Cross-field checks; override to add."""


# A JSON value whose type is in a field's pass-through set is already the field's value (a str
# for str, an int for int, None for X | None): the decoder runs only for the rest, which is
# where conversions happen and errors are named. JSON values are always of these types.
_JSON_TYPES = (str, int, float, bool, type(None), list, dict)
_PASS_THROUGH: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), float: (float,), bool: (bool,),
                                              Any: _JSON_TYPES}
_MISSING = object()


class _Field(typing.NamedTuple):
    name: str
    decode: Decoder
    pass_through: tuple[type, ...]
    where: str  # "Class.field"
    required: bool


# Per class, built on first use: a decode function specialized to its fields.
_DECODERS: dict[type, Callable[[Any], Record]] = {}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type[Record]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _fields(cls: type[Record]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        _Field(
            f.name, decoder(hints[f.name]), pass_through(hints[f.name]), f"{cls.__name__}.{f.name}",
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def _compile(cls: type[Record]) -> Callable[[Any], Record]:
    """Build (once) and remember the decode function of ``cls``."""
    fields = _fields(cls)
    known = frozenset(f.name for f in fields)
    name = cls.__name__

    def decode(data: Any) -> Record:
        if not isinstance(data, dict):
            raise ProtocolError(f"{name} must be a JSON object, got {_json_name(data)}")
        if not known.issuperset(data):
            unknown = sorted(key for key in data if key not in known)
            raise ProtocolError(f"{name} has unknown field(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for field_name, field_decoder, passes, where, required in fields:
            value = data.get(field_name, _MISSING)
            if value is _MISSING:
                if required:
                    raise ProtocolError(f"{where} is required")
            elif type(value) in passes:
                values[field_name] = value
            else:
                values[field_name] = field_decoder(value, where)
        record = cls(**values)
        record.validate()
        return record

    _DECODERS[cls] = decode
    return decode


def pass_through(hint: Any) -> tuple[type, ...]:
    """The JSON value types that are, unchanged, a valid value of the type ``hint``."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return (*pass_through(inner[0]), type(None)) if len(inner) == 1 else ()
    return _PASS_THROUGH.get(hint, ())


def decoder(hint: Any) -> Decoder:
    """The decoder of values of the type ``hint``; a type it cannot decode is a schema bug (TypeError)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"{hint!r}: of unions only X | None is supported")
        return _optional(decoder(inner[0]))
    if hint is Any:
        return lambda value, where: value
    if isinstance(hint, type) and issubclass(hint, Record):
        return _record(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum(hint)
    if origin in (tuple, list) and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):
        return _sequence(decoder(args[0]), pass_through(args[0]), origin)
    if origin is dict and args[0] is str:
        return _mapping(decoder(args[1]), pass_through(args[1]))
    if hint in _SCALARS:
        return _SCALARS[hint]
    raise TypeError(f"{hint!r} is not a type a Record can decode")


def _optional(inner: Decoder) -> Decoder:
    return lambda value, where: None if value is None else inner(value, where)


def _record(cls: type[Record]) -> Decoder:
    def decode(value: Any, where: str) -> Any:
        try:
            return cls.from_dict(value)
        except ProtocolError as e:
            raise ProtocolError(f"{where}: {e}") from None
    return decode


def _enum(cls: type[enum.Enum]) -> Decoder:
    members = {m.value: m for m in cls}
    choices = ", ".join(str(v) for v in members)

    def decode(value: Any, where: str) -> Any:
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value in members:
            return members[value]
        raise ProtocolError(f"{where} is {value!r}; use one of {choices}")
    return decode


def _sequence(item: Decoder, passes: tuple[type, ...], kind: type) -> Decoder:
    def decode(value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise _wrong(where, "a list", value)
        if all(type(v) in passes for v in value):  # a copy: the record must not share the caller's list
            return tuple(value) if kind is tuple else list(value)
        items = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if kind is tuple else items
    return decode


def _mapping(item: Decoder, passes: tuple[type, ...]) -> Decoder:
    def decode(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise _wrong(where, "an object", value)
        if all(type(v) in passes for v in value.values()):
            return dict(value)
        return {k: item(v, f"{where}[{k!r}]") for k, v in value.items()}
    return decode


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _wrong(where, "true or false", value)


def _int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):  # JSON true/false is no number
        return value
    raise _wrong(where, "an integer", value)


def _float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise _wrong(where, "a number", value)


def _str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise _wrong(where, "a string", value)


_SCALARS: dict[Any, Decoder] = {bool: _bool, int: _int, float: _float, str: _str}


def _wrong(where: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(f"{where} must be {expected}, got {_json_name(value)}")


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


_PLAIN = frozenset({str, int, float, bool, type(None)})


def encode(value: Any) -> Any:
    """JSON-ready form of a field value: records as objects, enums as their values."""
    if type(value) in _PLAIN:  # most values: checked first
        return value
    if isinstance(value, Record):
        return Record.to_dict(value)  # nested: its fields only, without a wire message's version
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value
