"""Typed backend options: `--llm-option KEY=VALUE` strings parsed into a backend's own dataclass,
declared with `typed_options.opt` and parsed by the same code as methods' `--opt` (one set of rules:
unknown keys and bad values are one-line errors naming the backend and what it takes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ...errors import UserError
from ...typed_options import parse_options as parse_typed


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a backend that takes none."""


def parse_options(options_cls: type, pairs: Sequence[str], backend: str):
    """An `options_cls` instance from "KEY=VALUE" strings (a later key wins; `-` may stand for `_`)."""
    raw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--llm-option '{pair}' is not KEY=VALUE")
        raw[key] = value
    return parse_typed(f"--llm {backend}", options_cls, raw, flag="--llm-option")
