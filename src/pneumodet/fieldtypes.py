"""Type checks of dataclass fields whose values come from untrusted files (``config.yaml``, checkpoint metadata).

A config read from YAML or JSON holds whatever the file says: ``epochs: "abc"``, ``image_size: [1, 2]``,
``lr: null``. :func:`check_field_types` compares every value with its field's annotation before any code
uses it, so a wrong type is one :class:`~pneumodet.errors.ConfigError` naming the field, never a
``TypeError`` deep inside training. The rules are strict where YAML is loose: ``true`` is not a whole
number, a number is not text, and text is never converted to a number.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from pneumodet.errors import ConfigError

__all__ = ["check_field_types", "check_range", "is_finite", "show_key"]

#: Text that YAML 1.1 reads as a string but a person means as a number (``1e-4`` needs a dot there).
_NUMBER_LIKE = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def check_field_types(cls: type, values: Mapping[str, Any], *, what: str = "config") -> None:
    """Raise :class:`ConfigError` naming the first key of ``values`` whose value does not fit the annotation
    of the same-named field of dataclass ``cls``.

    Keys that are not fields of ``cls`` are refused too. Only the keys present are checked, so a partial
    mapping (overrides of a few fields) can be checked as well as a whole instance's ``vars()``.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown {what} key {show_key(key)} (known: {', '.join(sorted(fields))})")
        expected = hints[key]
        if not _matches(value, expected):
            raise ConfigError(f"{what} {key} must be {_describe(expected)}, got {_show(value)}{_hint(value, expected)}")


def show_key(key: object) -> str:
    """A key from a file as it can be shown in a one-line message: a plain name as is, anything else quoted
    (``repr`` escapes newlines and control characters) and cut short."""
    if isinstance(key, str) and key.isidentifier() and len(key) <= 60:
        return key
    return _clip(repr(key))


def check_range(name: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high`` (``<`` where the bound is open)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else _number(low)
        right = "inf" if high is None else _number(high)
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{name} must be in {interval}, got {_clip(repr(value))}")


def is_finite(value: float) -> bool:
    """``math.isfinite`` that also answers (``False``) for an int too large for a float (JSON and YAML allow
    any number of digits)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if expected is Any:
        return True
    if expected is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:  # bool is an int subclass in Python; in a config it is a mistake
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and is_finite(value)
    if expected is str:  # a NUL byte is never part of a name or a path (os calls refuse it with ValueError)
        return isinstance(value, str) and "\x00" not in value
    if origin is tuple:
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if not isinstance(value, list | tuple):
            return False
        if item is not None:
            return all(_matches(v, item) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        key_type, value_type = args or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key_type) and _matches(v, value_type)
                                               for k, v in value.items())
    if isinstance(expected, type):
        return isinstance(value, expected)
    raise TypeError(f"check_field_types cannot check annotation {expected!r}")  # a programming error


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping of names to values"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
            type(None): "empty (null)"}.get(expected, getattr(expected, "__name__", str(expected)))


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _show(value: Any) -> str:
    kind = {bool: "true/false", str: "text", type(None): "null", list: "list", dict: "mapping", int: "whole number",
            float: "number"}.get(type(value), type(value).__name__)
    return f"{_clip(repr(value))} ({kind})"


def _hint(value: Any, expected: Any) -> str:
    if not (isinstance(value, str) and _NUMBER_LIKE.match(value) and (_matches(1, expected) or _matches(1.0, expected))):
        return ""
    if "e" in value.lower() and "." not in value:
        return f"; YAML reads {value.strip()} as text: write it with a dot, e.g. 1.0e-4"
    return "; write numbers without quotes"
