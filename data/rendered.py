"""The rendered datasets uniil draws itself, offline: name -> `RenderedSpec` (render_base.py).

Adding one is a module with a `draw` function and its spec, a registry entry in datasets.yaml, a
names file, and a line here.
"""

from __future__ import annotations

from .digits import DIGITS
from .patterns import PATTERNS
from .render_base import RenderedSpec
from .synthetic import SPECS as SHAPE_WORLD

RENDERED: dict[str, RenderedSpec] = {**SHAPE_WORLD, DIGITS.name: DIGITS, PATTERNS.name: PATTERNS}
