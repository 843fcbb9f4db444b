"""The synthetic dataset: procedurally rendered shapes with real class and domain names, offline.

Each image shows one shape (the class) in a named colour, texture and size, rotated, with
optional clutter (small distractor shapes) and an occluder, rendered in one domain:
`photo` (lit gradient background, shading, noise), `clipart` (flat fill, thick outline),
`sketch` (pencil edges only), `painting` (brush-stroke background, blurred) and `inverted`
(a photo with inverted colours). Every image is a pure function of (seed, split, domain, class,
index), so any subset renders identically in any order, and its ground truth is recorded.

Two datasets are drawn from this world: `synthetic` (the class is the shape) and
`synthetic-colours` (the colour). uniil-micro is pre-trained on these renders, so they must stay
bit-identical (same random keys, same RENDER_VERSION). rendered.py lists every rendered dataset.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .render_base import SPLIT_STREAMS, RenderedDataset, RenderedSpec, registry_classes

COLOURS = {"red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 210, 40), "green": (50, 160, 60),
           "blue": (40, 80, 210), "purple": (130, 60, 170), "pink": (240, 130, 180), "brown": (130, 80, 40),
           "black": (30, 30, 30), "white": (245, 245, 245), "gray": (128, 128, 128), "cyan": (40, 200, 210)}
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = {"small": 0.42, "medium": 0.6, "large": 0.78}
DOMAINS = ("photo", "clipart", "sketch", "painting", "inverted")
# Bump when rendering changes: cached renders and features of older renders become stale, and so
# do uniil-micro's weights, which were trained on these images (backbones/spec.py).
RENDER_VERSION = 1


@dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 64
    seed: int = 0
    rotation: bool = True
    clutter: int = 2  # distractor shapes per image (0..clutter)
    occluder_prob: float = 0.3


@dataclass(frozen=True)
class SampleTruth:
    """What the renderer drew: enough to caption the image or score attribute matches."""

    shape: str
    colour: str
    texture: str
    size: str
    domain: str
    angle: float


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17 + 0.1))
    return pts


# Each shape: a list of (polygon in unit coordinates, fill) parts; fill 0 cuts a hole.
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_regular(64), 255)],
    "ellipse": [([(x, 0.55 * y) for x, y in _regular(64)], 255)],
    "semicircle": [([(math.cos(a), -math.sin(a) + 0.4) for a in np.linspace(0, math.pi, 33)], 255)],
    "crescent": [(_regular(64), 255), ([(x + 0.45, y - 0.15) for x, y in _regular(64, 0.85)], 0)],
    "ring": [(_regular(64), 255), (_regular(64, 0.55), 0)],
    "square": [([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 255)],
    "rectangle": [([(-1, -0.5), (1, -0.5), (1, 0.5), (-1, 0.5)], 255)],
    "diamond": [([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], 255)],
    "trapezoid": [([(-0.5, -0.6), (0.5, -0.6), (1, 0.6), (-1, 0.6)], 255)],
    "parallelogram": [([(-0.5, -0.6), (1, -0.6), (0.5, 0.6), (-1, 0.6)], 255)],
    "triangle": [(_regular(3, 1.0, -math.pi / 2), 255)],
    "right triangle": [([(-0.8, -0.9), (-0.8, 0.8), (0.9, 0.8)], 255)],
    "pentagon": [(_regular(5), 255)],
    "hexagon": [(_regular(6), 255)],
    "octagon": [(_regular(8, 1.0, math.pi / 8), 255)],
    "star": [(_star(5, 0.42), 255)],
    "four-pointed star": [(_star(4, 0.35), 255)],
    "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 255)],
    "arrow": [([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)], 255)],
    "chevron": [([(-0.9, -0.8), (-0.3, -0.8), (0.6, 0), (-0.3, 0.8), (-0.9, 0.8), (0, 0)], 255)],
    "heart": [(_heart(), 255)],
    "kite": [([(0, -1), (0.55, -0.35), (0, 1), (-0.55, -0.35)], 255)],
    "lightning bolt": [([(0.1, -1), (0.6, -1), (0.15, -0.15), (0.55, -0.15), (-0.35, 1), (-0.05, 0.15),
                         (-0.45, 0.15)], 255)],
    "house": [([(-0.75, -0.1), (0, -0.9), (0.75, -0.1), (0.75, 0.85), (-0.75, 0.85)], 255)],
}


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    return registry_classes("synthetic", SHAPES)


@lru_cache(maxsize=1)
def colour_names() -> tuple[str, ...]:
    return registry_classes("synthetic-colours", COLOURS)


# The two datasets of the shape world: what the label of an image is. `synthetic` labels the shape;
# `synthetic-colours` (a second task on the same world) labels the shape's colour. Sketches have
# no colour and inverted images turn colours into their complements: the colour task leaves both out.
# (Every rendered dataset, these two included, is listed in rendered.RENDERED.)
TARGET_DATASETS = {"shape": "synthetic", "colour": "synthetic-colours"}
TARGET_DOMAINS = {"shape": DOMAINS, "colour": ("photo", "clipart", "painting")}


def _rng(config: SyntheticConfig, split: str, domain: str, label: int, index: int,
         target: str = "shape") -> np.random.Generator:
    key = [config.seed, SPLIT_STREAMS[split], DOMAINS.index(domain), label, index]
    if target != "shape":  # another dataset: other images (shape keys stay as they were)
        key.append(list(TARGET_DOMAINS).index(target))
    return np.random.default_rng(np.random.SeedSequence(key))


def _mask(shape: str, size_px: float, angle: float, centre: tuple[float, float], canvas: int) -> Image.Image:
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(angle), math.sin(angle)
    for poly, fill in SHAPES[shape]:
        pts = [(centre[0] + size_px / 2 * (x * c - y * s), centre[1] + size_px / 2 * (x * s + y * c)) for x, y in poly]
        draw.polygon(pts, fill=fill)
    return mask


def _texture(texture: str, colour: tuple[int, int, int], canvas: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (canvas, canvas), colour)
    if texture == "solid":
        return img
    other = tuple(int(v * 0.35 + 255 * 0.65) if sum(colour) < 380 else int(v * 0.45) for v in colour)
    draw = ImageDraw.Draw(img)
    period = max(4, canvas // int(rng.integers(6, 10)))
    if texture == "striped":
        for x in range(-canvas, 2 * canvas, period):
            draw.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 + canvas // 2, canvas), (x + canvas // 2, canvas)],
                         fill=other)
    elif texture == "dotted":
        r = max(1, period // 4)
        for y in range(period // 2, canvas, period):
            for x in range(period // 2, canvas, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=other)
    else:  # checkered
        for y in range(0, canvas, period):
            for x in range(0, canvas, period):
                if (x // period + y // period) % 2:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=other)
    return img


def _background(domain: str, canvas: int, rng: np.random.Generator) -> Image.Image:
    if domain in ("photo", "inverted"):
        a, b = rng.integers(60, 230, size=3), rng.integers(60, 230, size=3)
        t = np.linspace(0, 1, canvas)[:, None, None]
        grad = (a * (1 - t) + b * t).astype(np.uint8)
        return Image.fromarray(np.repeat(grad, canvas, axis=1))
    if domain == "painting":
        img = Image.new("RGB", (canvas, canvas), tuple(int(v) for v in rng.integers(120, 230, size=3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.integers(0, canvas, size=2)
            dx, dy = rng.integers(-canvas // 2, canvas // 2, size=2)
            draw.line([(int(x), int(y)), (int(x + dx), int(y + dy))], width=int(rng.integers(canvas // 16, canvas // 6)),
                      fill=tuple(int(v) for v in rng.integers(90, 240, size=3)))
        return img
    return Image.new("RGB", (canvas, canvas), (250, 250, 248) if domain == "sketch" else (255, 255, 255))


def _paint_shape(img: Image.Image, mask: Image.Image, truth_colour, texture: str, domain: str,
                 rng: np.random.Generator, canvas: int) -> None:
    if domain == "sketch":
        edges = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 60 else 0)
        edges = edges.filter(ImageFilter.MaxFilter(3))
        pencil = Image.new("RGB", img.size, tuple(int(v) for v in rng.integers(40, 90, size=1).repeat(3)))
        img.paste(pencil, (0, 0), edges)
        return
    fill = _texture(texture, truth_colour, canvas, rng)
    if domain in ("photo", "inverted"):  # directional light across the shape
        shade = np.linspace(1.15, 0.75, canvas)[None, :, None] if rng.random() < 0.5 else \
            np.linspace(1.15, 0.75, canvas)[:, None, None]
        fill = Image.fromarray(np.clip(np.asarray(fill, np.float32) * shade, 0, 255).astype(np.uint8))
    img.paste(fill, (0, 0), mask)
    if domain == "clipart":
        outline = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 60 else 0).filter(ImageFilter.MaxFilter(5))
        img.paste(Image.new("RGB", img.size, (15, 15, 15)), (0, 0), outline)


def render(shape: str, colour: str, texture: str, size: str, domain: str, rng: np.random.Generator,
           config: SyntheticConfig = SyntheticConfig()) -> tuple[Image.Image, SampleTruth]:
    scale = 2  # supersampled, then downsampled: smooth edges without an antialiasing rasteriser
    canvas = config.image_size * scale
    img = _background(domain, canvas, rng)
    for _ in range(int(rng.integers(0, config.clutter + 1))):  # distractors: small, other shapes
        other = str(rng.choice([s for s in SHAPES if s != shape]))
        centre = tuple(float(v) for v in rng.uniform(0.1, 0.9, size=2) * canvas)
        m = _mask(other, canvas * 0.18, float(rng.uniform(0, 2 * math.pi)), centre, canvas)
        c = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
        img.paste(Image.new("RGB", img.size, tuple(int(v * 0.6 + 100) for v in c)), (0, 0), m.point(lambda v: v // 2))
    angle = float(rng.uniform(0, 2 * math.pi)) if config.rotation else 0.0
    size_px = canvas * SIZES[size]
    margin = size_px / 2 + 2
    centre = tuple(float(v) for v in rng.uniform(margin, canvas - margin, size=2)) if margin < canvas / 2 else (canvas / 2,) * 2
    mask = _mask(shape, size_px, angle, centre, canvas)
    _paint_shape(img, mask, COLOURS[colour], texture, domain, rng, canvas)
    if rng.random() < config.occluder_prob:  # an occluding block hides part of the shape
        w, h = (rng.uniform(0.15, 0.3, size=2) * canvas).astype(int)
        x, y = (np.asarray(centre) + rng.uniform(-0.4, 0.4, size=2) * size_px).astype(int)
        grey = int(rng.integers(40, 200))
        ImageDraw.Draw(img).rectangle([x, y, x + w, y + h], fill=(grey, grey, grey))
    if domain == "painting":
        img = img.filter(ImageFilter.GaussianBlur(radius=scale * 1.2))
    img = img.resize((config.image_size, config.image_size), Image.LANCZOS)
    if domain in ("photo", "inverted"):
        noisy = np.asarray(img, np.float32) + rng.normal(0, 6, size=(config.image_size, config.image_size, 3))
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if domain == "inverted":
        img = ImageChops.invert(img)
    return img, SampleTruth(shape, colour, texture, size, domain, round(math.degrees(angle), 1))


def render_item(target: str, label: int, index: int, split: str, domain: str,
                config: SyntheticConfig = SyntheticConfig()) -> tuple[Image.Image, SampleTruth]:
    """Image `index` of class `label` of the shape ("synthetic") or colour ("synthetic-colours") task."""
    rng = _rng(config, split, domain, label, index, target)
    if target == "shape":
        shape, colour = class_names()[label], str(rng.choice(list(COLOURS)))
    else:
        shape, colour = str(rng.choice(list(SHAPES))), colour_names()[label]
    texture = str(rng.choice(TEXTURES))
    size = str(rng.choice(list(SIZES)))
    return render(shape, colour, texture, size, domain, rng, config)


def _spec(target: str, classes) -> RenderedSpec:
    def draw(label: int, index: int, split: str, domain: str, config: SyntheticConfig) -> Image.Image:
        return render_item(target, label, index, split, domain, config)[0]

    return RenderedSpec(TARGET_DATASETS[target], tuple(TARGET_DOMAINS[target]), RENDER_VERSION, draw, classes,
                        SyntheticConfig())


SPECS = {"synthetic": _spec("shape", class_names),
         "synthetic-colours": _spec("colour", colour_names)}


class SyntheticDataset(RenderedDataset):
    """`n_per_class` images of each class in one domain and split; items are (PIL image, label).

    `target` says what a class is: "shape" (the `synthetic` dataset) or "colour" (`synthetic-colours`)."""

    def __init__(self, split: str = "train", domain: str = "photo", n_per_class: int = 20,
                 classes: list[str] | None = None, config: SyntheticConfig = SyntheticConfig(),
                 target: str = "shape"):
        if target not in TARGET_DOMAINS:
            raise ValueError(f"unknown target {target!r}; use {', '.join(TARGET_DOMAINS)}")
        if domain not in TARGET_DOMAINS[target]:
            raise ValueError(f"unknown domain {domain!r} for the {target} task; use {', '.join(TARGET_DOMAINS[target])}")
        super().__init__(SPECS[TARGET_DATASETS[target]], split, domain, n_per_class, classes, config)
        self.target = target

    def render(self, i: int) -> tuple[Image.Image, SampleTruth]:
        label, k = self._item(i)
        return render_item(self.target, label, k, self.split, self.domain, self.config)

    def image(self, i: int) -> Image.Image:
        return self.render(i)[0]

    def truth(self, i: int) -> SampleTruth:
        return self.render(i)[1]

    def export_image_folder(self, root: Path) -> Path:
        """Write root/<class>/<domain>_<index>.png (torchvision's ImageFolder layout) plus truth.jsonl."""
        import json

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "truth.jsonl", "w") as fh:
            for i in range(len(self)):
                img, truth = self.render(i)
                label, k = self._item(i)
                folder = root / self.classes[label].replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{self.domain}_{k:05d}.png")
                fh.write(json.dumps({"path": f"{folder.name}/{self.domain}_{k:05d}.png", **asdict(truth)}) + "\n")
        return root

