"""Typed options declared once, as a dataclass: that declaration parses `KEY=VALUE` text,
validates, records and documents them. Methods use it for `--opt` (with presets), LLM backends for
`--llm-option`. It imports nothing of uniil but `errors`, so every layer may use it.

    @dataclass(frozen=True)
    class Options(ContinualMethod.Options):
        top_k: int = opt(2, "experts each image is routed to", minimum=1)
        kind: str = opt("both", "attributes that route", choices=("class", "domain", "both"))
        quantile: float = opt(0.05, "selector quantile", fraction=True)

A value may arrive as text (the command line) or already typed (Python callers, presets, a
recorded config); both go through `parse_value`, so the same rules hold everywhere: whole numbers
for int, true/false (1/0, yes/no) for bool, finite numbers, fractions in [0, 1], one of `choices`.
Fields typed `X | None` also take `none` (or null). A method's `presets` name bundles of values
that option `preset` applies before the explicit ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from .errors import UserError

SCALARS = (bool, int, float, str)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def opt(default, help: str, *, choices: tuple | None = None, minimum: float | None = None,
        positive: bool = False, fraction: bool = False, separator: str | None = None,
        check: Callable[[Any], str | None] | None = None):
    """A declared option: `default`, one line of `help`, and how its values are checked.

    minimum: lowest allowed value (inclusive); positive: > 0; fraction: in [0, 1]; separator: a
    str option that holds several values (a list given for it is joined); check: value -> an error
    message or None, for rules the others cannot say."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum,
            "positive": positive, "fraction": fraction, "separator": separator, "check": check}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """What help screens (`uniil methods show`) print about one option, and what parsing needs."""

    name: str
    kind: type  # bool, int, float or str
    optional: bool  # None is a value
    default: Any
    help: str
    choices: tuple | None
    meta: Mapping

    @property
    def type_name(self) -> str:
        return self.kind.__name__ + (" or none" if self.optional else "")


def option_specs(options_class: type, presets: Mapping[str, Mapping] | None = None) -> list[OptionSpec]:
    """The declared options of a dataclass, in declaration order. Raises TypeError for a
    declaration the parser cannot serve (a programming error of its declarer, not a user's)."""
    if not dataclasses.is_dataclass(options_class):
        raise TypeError(f"{options_class.__qualname__} must be a dataclass")
    hints = typing.get_type_hints(options_class)
    specs = []
    for f in dataclasses.fields(options_class):
        kind, optional = _scalar(hints[f.name], f"{options_class.__qualname__}.{f.name}")
        if f.default is dataclasses.MISSING:
            raise TypeError(f"option {f.name} of {options_class.__qualname__} needs a default")
        help_text = f.metadata.get("help")
        if not help_text or "\n" in help_text:
            raise TypeError(f"option {f.name} of {options_class.__qualname__} needs one line of help: use opt()")
        choices = f.metadata.get("choices")
        if f.name == "preset" and presets:
            choices = tuple(presets)  # the preset names are the choices: declared once, in `presets`
        specs.append(OptionSpec(f.name, kind, optional, f.default, help_text, choices, f.metadata))
    return specs


def _scalar(hint, where: str) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in SCALARS:
            return rest[0], True
    if hint in SCALARS:
        return hint, False
    raise TypeError(f"option {where} has type {hint}; use bool, int, float or str (or one of them | None)")


def parse_value(spec: OptionSpec, value, flag: str = "--opt"):
    """A typed value for one option, or a UserError (without the owner's name) saying what is wrong."""
    shown = f"{flag} {spec.name}={value!r}"
    if spec.optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    if value is None:
        raise UserError(f"{shown}: a value is needed")
    kind = spec.kind
    if kind is bool:
        text = str(value).strip().lower() if not isinstance(value, float) else ""
        if text not in _TRUE + _FALSE:
            raise UserError(f"{shown}: write true or false")
        typed = text in _TRUE
    elif kind in (int, float):
        wanted = "a whole number" if kind is int else "a number"
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (kind is int and not number.is_integer()):
            raise UserError(f"{shown}: expected {wanted}")
        typed = kind(number)
    else:
        sep = spec.meta.get("separator")
        if sep and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = sep.join(value)
        if not isinstance(value, str):
            raise UserError(f"{shown}: expected text")
        typed = value
    _check_range(spec, typed, shown)
    return typed


def _check_range(spec: OptionSpec, value, shown: str) -> None:
    meta = spec.meta
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{shown}: use one of {', '.join(map(str, spec.choices))}")
    if meta.get("fraction") and not 0.0 <= value <= 1.0:
        raise UserError(f"{shown}: must be between 0 and 1 (e.g. 0.05 for 5%)")
    if meta.get("positive") and not value > 0:
        raise UserError(f"{shown}: must be positive")
    low = meta.get("minimum")
    if low is not None and value < low:
        raise UserError(f"{shown}: must not be negative" if low == 0 else f"{shown}: must be at least {low}")
    check = meta.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise UserError(f"{shown}: {problem}")


def parse_options(owner: str, options_class: type, raw: Mapping | None,
                  presets: Mapping[str, Mapping] | None = None, flag: str = "--opt"):
    """An `options_class` instance from `raw` (key -> text or typed value). With `presets`, the
    bundle named by `preset` (or the field's default) is applied first, then the explicit keys.
    Every problem is a one-line UserError that names the owner (a method, `--llm NAME`) and its keys."""
    raw = dict(raw or {})
    specs = {s.name: s for s in option_specs(options_class, presets)}
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise UserError(f"{owner}: unknown option(s) {', '.join(unknown)}; known: {', '.join(specs) or 'none'}")
    values = {}
    try:
        if presets and "preset" in specs:
            name = parse_value(specs["preset"], raw.get("preset", specs["preset"].default), flag)
            values = {k: parse_value(specs[k], v, flag) for k, v in presets[name].items()}
        values.update({k: parse_value(specs[k], v, flag) for k, v in raw.items()})
        opts = options_class(**values)
        check = getattr(opts, "check", None)
        if check is not None:
            check()  # rules that relate several options
    except UserError as exc:
        raise UserError(f"{owner}: {exc} (options: {', '.join(specs)})") from None
    return opts


def options_json(opts) -> dict:
    """The resolved options as the JSON a run records."""
    return dataclasses.asdict(opts)


def format_value(value) -> str:
    """A typed value as `KEY=VALUE` text that parses back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def check_presets(method: str, options_class: type, presets: Mapping[str, Mapping]) -> None:
    """Every preset names declared options with valid values (checked once, when a method registers)."""
    if not presets:
        return
    specs = {s.name: s for s in option_specs(options_class, presets)}
    if "preset" not in specs:
        raise TypeError(f"method {method} has presets but declares no option `preset`")
    for name, bundle in presets.items():
        for key, value in bundle.items():
            if key not in specs or key == "preset":
                raise TypeError(f"preset {name} of method {method} sets undeclared option {key}")
            try:
                parse_value(specs[key], value)
            except UserError as exc:  # the method's mistake, not the user's: no one-line error for it
                raise TypeError(f"preset {name} of method {method}: {exc}") from None
    if specs["preset"].default not in presets:
        raise TypeError(f"method {method}: the default preset {specs['preset'].default!r} is not one of its presets")
