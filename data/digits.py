"""`synthetic-digits`: handwritten-style digit scans, rendered from strokes, offline.

Each digit is a few pen strokes (polylines and elliptic arcs) in a glyph box. Every image draws
them as one hand would: the control points wobble, the glyph is slanted, rotated, scaled and moved,
the pen has its own width and pressure, and the scan is blurred and noisy: light strokes on a dark
background, as in MNIST. No font is used, so the images are the same on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .render_base import RenderConfig, RenderedSpec, finish, image_rng, registry_classes

NAME = "synthetic-digits"
DOMAINS = ("scan",)
RENDER_VERSION = 1  # bump when a pixel changes: cached renders and features are keyed by it
SUPERSAMPLE = 4  # strokes are drawn this many times larger, then downsampled: smooth edges

Point = tuple[float, float]


@dataclass(frozen=True)
class Hand:
    """How much one writer and one scan differ from the next: the ranges each image draws from.
    Wider ranges make the task harder for a frozen backbone (changing one changes pixels: bump
    RENDER_VERSION)."""

    height: tuple[float, float] = (0.55, 0.72)  # glyph height, fraction of the image
    aspect: tuple[float, float] = (0.85, 1.15)
    slant: float = 0.25  # shear x += slant * y, up to this either way
    rotation: float = 8.0  # degrees either way
    # centre offset, fraction of the image either way: small, as scans are centred (MNIST centres
    # on the ink's mass); wider offsets cost a frozen uniil-micro most (linear probe 73% -> 52% at 0.12)
    shift: float = 0.07
    wobble: tuple[float, float] = (0.015, 0.04)  # unsteadiness of the hand, glyph units
    pen: tuple[float, float] = (0.08, 0.13)  # stroke width, fraction of the image
    blur: tuple[float, float] = (0.4, 1.0)  # pixels


HAND = Hand()


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 14) -> list[Point]:
    """Points of an elliptic arc in glyph coordinates (y down, so 90 degrees points down)."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(start, end, n)]


# Glyph box: x in [-0.5, 0.5], y in [-1, 1] (y down). Each digit has one or more variants (ways
# people write it); a variant is a list of strokes, a stroke a polyline (arcs are sampled densely
# enough to read as curves once the pen is wide).
GLYPHS: dict[str, list[list[list[Point]]]] = {
    "zero": [[_arc(0, 0, 0.45, 0.92, -90, 275, 24)]],
    "one": [[[(-0.28, -0.6), (0.05, -0.95), (0.05, 0.95)]],
            [[(0.0, -0.95), (0.0, 0.95)]],
            [[(-0.28, -0.6), (0.05, -0.95), (0.05, 0.95)], [(-0.3, 0.95), (0.4, 0.95)]]],
    "two": [[_arc(0, -0.45, 0.42, 0.45, 195, 380) + [(-0.45, 0.92), (0.5, 0.92)]]],
    "three": [[_arc(0, -0.5, 0.38, 0.42, 200, 450) + _arc(0, 0.45, 0.45, 0.5, 270, 520)[1:]]],
    "four": [[[(0.18, -0.95), (-0.48, 0.35), (0.5, 0.35)], [(0.22, -0.45), (0.22, 0.95)]],
             [[(-0.3, -0.95), (-0.45, 0.3), (0.5, 0.3)], [(0.25, -0.9), (0.25, 0.95)]]],
    "five": [[[(0.42, -0.92), (-0.3, -0.92), (-0.36, -0.08)] + _arc(0, 0.42, 0.46, 0.5, 238, 500)]],
    "six": [[[(0.32, -0.95), (-0.1, -0.55), (-0.38, 0.0)] + _arc(0, 0.5, 0.42, 0.44, 185, 545, 20)]],
    "seven": [[[(-0.45, -0.9), (0.45, -0.9), (-0.1, 0.95)]],
              [[(-0.45, -0.9), (0.45, -0.9), (-0.1, 0.95)], [(-0.15, 0.0), (0.4, 0.0)]]],
    "eight": [[_arc(0, -0.5, 0.36, 0.42, 90, 450, 20), _arc(0, 0.45, 0.45, 0.5, -90, 270, 20)]],
    "nine": [[_arc(0, -0.45, 0.42, 0.45, 0, 360, 20), [(0.42, -0.45), (0.36, 0.3), (0.12, 0.95)]],
             [_arc(0, -0.45, 0.42, 0.45, 0, 360, 20), [(0.42, -0.45), (0.42, 0.95)]]],
}


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    return registry_classes(NAME, GLYPHS)


def draw_digit(label: int, index: int, split: str, domain: str, config: RenderConfig) -> Image.Image:
    rng = image_rng(NAME, config, split, DOMAINS.index(domain), label, index)
    size = config.image_size
    canvas = size * SUPERSAMPLE
    height = rng.uniform(*HAND.height) * canvas / 2  # half the glyph's height, in canvas pixels
    aspect = rng.uniform(*HAND.aspect)
    slant = rng.uniform(-HAND.slant, HAND.slant)
    angle = math.radians(rng.uniform(-HAND.rotation, HAND.rotation))
    cx, cy = canvas / 2 + rng.uniform(-HAND.shift, HAND.shift, size=2) * canvas
    c, s = math.cos(angle), math.sin(angle)
    wobble = rng.uniform(*HAND.wobble)

    def place(x: float, y: float) -> tuple[float, float]:
        x = (x + slant * y) * aspect
        return cx + height * (x * c - y * s), cy + height * (x * s + y * c)

    ink = Image.new("L", (canvas, canvas), 0)
    pen = ImageDraw.Draw(ink)
    width = max(1, int(rng.uniform(*HAND.pen) * canvas))
    pressure = int(rng.integers(190, 256))
    variants = GLYPHS[class_names()[label]]
    for stroke in variants[int(rng.integers(len(variants)))]:
        # One smooth displacement per stroke end plus a little per point: strokes bend, not jitter.
        start, end = rng.normal(0, wobble, size=(2, 2))
        pts = [place(x + start[0] * (1 - t) + end[0] * t + rng.normal(0, wobble / 3),
                     y + start[1] * (1 - t) + end[1] * t + rng.normal(0, wobble / 3))
               for t, (x, y) in zip(np.linspace(0, 1, len(stroke)), stroke)]
        pen.line(pts, fill=pressure, width=width, joint="curve")
        r = width / 2
        for x, y in (pts[0], pts[-1]):  # round pen tips
            pen.ellipse([x - r, y - r, x + r, y + r], fill=pressure)
    ink = ink.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*HAND.blur) * SUPERSAMPLE))
    background = rng.uniform(0, 35)
    gray = background + np.asarray(ink, np.float32) * (1 - background / 255)
    return finish(gray, size, rng, noise=rng.uniform(2, 10))


DIGITS = RenderedSpec(NAME, DOMAINS, RENDER_VERSION, draw_digit, class_names, RenderConfig())
