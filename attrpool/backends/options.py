"""Typed backend options: `--llm-option KEY=VALUE` strings parsed into a backend's own dataclass.

A backend declares its options as a frozen dataclass of str, int, float or bool fields (optionally
`| None`) with defaults. A key the dataclass does not have, or a value of the wrong type, is a
one-line error naming the backend and what it takes, so a typo never silently changes nothing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence

from ...errors import UserError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a backend that takes none."""


def _convert(kind: type, key: str, value: str):
    try:
        if kind is bool:
            low = value.strip().lower()
            if low not in _TRUE + _FALSE:
                raise ValueError(value)
            return low in _TRUE
        return kind(value) if kind is str else kind(value.strip())
    except ValueError:
        raise UserError(f"--llm-option {key}={value}: expected {_TYPE_WORDS.get(kind, kind.__name__)}") from None


def _field_type(hint) -> type:
    """`int` from `int` or `int | None`: the type a value string converts to."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def option_keys(options_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(options_cls)]


def parse_options(options_cls: type, pairs: Sequence[str], backend: str):
    """An `options_cls` instance from "KEY=VALUE" strings (a later key wins); refuses unknown keys."""
    keys = option_keys(options_cls)
    hints = typing.get_type_hints(options_cls)
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--llm-option '{pair}' is not KEY=VALUE")
        if key not in keys:
            takes = f"it takes {', '.join(keys)}" if keys else "it takes none"
            raise UserError(f"unknown --llm-option '{key}' for --llm {backend}; {takes}")
        values[key] = _convert(_field_type(hints[key]), key, value)
    return options_cls(**values)  # its __post_init__ may refuse a value out of range (a UserError)
