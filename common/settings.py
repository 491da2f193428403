"""Typed settings: a config dataclass built from a TOML file and environment overrides.

Names and types come from the dataclass (``typing.get_type_hints``); a field declares its range
next to it, ``port: int = field(default=8470, metadata=PORT)``. Precedence: environment > file >
default (a command-line flag, applied by its CLI, beats all three). Every error is one line that
names the file or variable and the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import textwrap
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from .errors import EdgefleetError

T = TypeVar("T")


class DataclassInstance(Protocol):  # as typeshed's, which the import allowlist keeps out of common
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


class ConfigError(EdgefleetError, ValueError):
    """A config file or environment variable that does not fit its settings dataclass."""


@dataclasses.dataclass(frozen=True)
class Range:
    low: float
    high: float = math.inf
    include_low: bool = True

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.include_low else value > self.low
        return above and value <= self.high  # NaN is in no range

    def __str__(self) -> str:
        if self.high != math.inf:
            return f"between {self.low:g} and {self.high:g}"
        return f"{self.low:g} or more" if self.include_low else f"greater than {self.low:g}"


# Field metadata: the range a number must be in, or FIXED for a field the caller sets
# (never the file or the environment).
PORT: Mapping[str, object] = {"range": Range(1, 65535)}
POSITIVE: Mapping[str, object] = {"range": Range(0, include_low=False)}   # intervals, timeouts, sizes
COUNT: Mapping[str, object] = {"range": Range(0)}
FIXED: Mapping[str, object] = {"fixed": True}

_EXPECTED = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             Path: "a path (a string)", dict: "a table"}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one dataclass's settings come from, and how errors name it."""

    label: str                   # "agent config"
    path: Path | None            # the TOML file; None: defaults and environment only
    env_prefix: str              # "EDGEFLEET_AGENT_"
    environ: Mapping[str, str]

    def in_file(self, message: str) -> ConfigError:
        where = f"{self.label} {self.path}" if self.path else self.label
        return ConfigError(f"{where}: {message}")

    def in_env(self, message: str) -> ConfigError:
        return ConfigError(f"{self.label}: {message}; fix or unset the variable")


def load(cls: type[T], path: Path | None, label: str, env_prefix: str,
         environ: Mapping[str, str] | None = None, **fixed: object) -> T:
    """``cls`` from its defaults, the TOML file at ``path`` (if given) and ``environ``
    (default ``os.environ``); ``fixed`` sets the FIXED fields."""
    source = Source(label, path, env_prefix, os.environ if environ is None else environ)
    table = read_toml(path, label) if path is not None else {}
    return _build(cls, table, source, key_prefix="", env_prefix=env_prefix, fixed=fixed)


def read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {label} {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:  # the message ends "(at line L, column C)"
        raise ConfigError(f"{label} {path}: invalid TOML: {e}; fix the file") from None


def environment_variables(cls: type, env_prefix: str) -> list[str]:
    """Every variable that overrides a setting of ``cls``, nested tables included."""
    names: list[str] = []
    for f, kind in _settings(cls):
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            names += environment_variables(kind, f"{env_prefix}{f.name.upper()}_")
        else:
            names.append(f"{env_prefix}{f.name.upper()}")
    return names


def environment_help(cls: type, env_prefix: str, file: str) -> str:
    """The help text's account of where settings come from (``file``: which config file)."""
    variables = textwrap.wrap("  ".join(environment_variables(cls, env_prefix)), width=78,
                              initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join([f"Precedence: command-line flag > environment > {file} > default.",
                      f"Each key of {file} is also read from the environment:", *variables])


def to_toml(settings: DataclassInstance) -> str:
    """Top-level ``key = value`` lines of a flat settings dataclass."""
    return "".join(f"{f.name} = {toml_value(getattr(settings, f.name))}\n"
                   for f in dataclasses.fields(settings))


def toml_value(value: object) -> str:
    """A TOML literal; JSON's string escapes are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _settings(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("fixed")]


def _build(cls: type[T], table: Mapping[str, object], source: Source, key_prefix: str,
           env_prefix: str, fixed: Mapping[str, object]) -> T:
    settings = _settings(cls)
    _reject_unknown(table, [f.name for f, _ in settings], source, key_prefix)
    values: dict[str, object] = dict(fixed)
    for f, kind in settings:
        key, variable = f"{key_prefix}{f.name}", f"{env_prefix}{f.name.upper()}"
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            nested = table.get(f.name, {})
            if not isinstance(nested, dict):
                raise source.in_file(f"{key} must be a table ([{key}]), got {_shown(nested)}")
            values[f.name] = _build(kind, nested, source, f"{key}.", f"{variable}_", {})
            continue
        if f.name in table:
            try:
                values[f.name] = _checked(kind, f, table[f.name])
            except _Mismatch as e:
                raise source.in_file(f"{key} {e}") from None
        if variable in source.environ:
            try:
                values[f.name] = _checked(kind, f, _parse_env(kind, source.environ[variable]))
            except _Mismatch as e:
                raise source.in_env(f"{variable} {e}") from None
    return cls(**values)


def _reject_unknown(table: Mapping[str, object], known: list[str], source: Source, key_prefix: str) -> None:
    unknown = sorted(set(table) - set(known))
    if not unknown:
        return
    guesses = [g for name in unknown for g in difflib.get_close_matches(name, known, n=1)]
    hint = f"did you mean {', '.join(key_prefix + g for g in guesses)}?" if guesses else "remove or rename it"
    names = ", ".join(key_prefix + name for name in unknown)
    raise source.in_file(f"unknown key(s) {names}; {hint}")


class _Mismatch(Exception):
    """What is wrong with one value ("must be a number, got 'fast'"); the caller names where."""


def _checked(kind: Any, f: dataclasses.Field[Any], value: object) -> object:
    """``value`` as the field's type, inside the field's range."""
    base = typing.get_origin(kind) or kind
    if base not in _EXPECTED:
        raise TypeError(f"settings field {f.name} has unsupported type {kind!r}")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
        dict: isinstance(value, dict),
    }[base]
    if not ok:
        raise _Mismatch(f"must be {_EXPECTED[base]}, got {_shown(value)}")
    typed = base(value)
    bounds = f.metadata.get("range")
    if bounds is not None and typed not in bounds:
        raise _Mismatch(f"must be {bounds}, got {_shown(value)}")
    return typed


def _parse_env(kind: Any, text: str) -> object:
    """A variable's text as the TOML value it stands for; text that does not parse is
    returned as it is, and fails the type check with the variable's name."""
    base = typing.get_origin(kind) or kind
    try:
        if base is bool:
            return {"true": True, "false": False}.get(text.strip().lower(), text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is dict:  # an inline table: {arch = "aarch64"}
            return tomllib.loads(f"value = {text}")["value"]
    except (ValueError, tomllib.TOMLDecodeError):
        pass
    return text


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
