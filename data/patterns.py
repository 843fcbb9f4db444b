"""`synthetic-patterns`: full-frame texture close-ups, rendered procedurally, offline.

The pattern fills the whole image: no object, no background. Each class is a field computed on a
pixel grid (brick courses, wood grain, woven strips, a hexagonal lattice, ...); every image draws
its own colours, scale, rotation, phase and distortion, then lighting and sensor noise, so the
classes are told apart by structure, never by colour.
"""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

from .render_base import RenderConfig, RenderedSpec, finish, image_rng, registry_classes

NAME = "synthetic-patterns"
DOMAINS = ("close-up",)
RENDER_VERSION = 1  # bump when a pixel changes: cached renders and features are keyed by it
SUPERSAMPLE = 2  # fields are sampled at twice the size, then downsampled: no aliased edges

Grid = tuple[np.ndarray, np.ndarray]  # x, y in image units, [-0.5, 0.5), one value per pixel


def _colours(rng: np.random.Generator, k: int) -> np.ndarray:
    """k colours [k, 3] in 0..255: random hues, and values spread apart so that they contrast (a
    close-up is lit and in focus: its darkest and lightest colours are far apart)."""
    spread = rng.uniform(0.55, 0.8)
    low = rng.uniform(0.1, 0.95 - spread)
    values = low + spread * np.concatenate([[0.0, 1.0], rng.random(k - 2)])
    rng.shuffle(values)
    base = rng.uniform(0, 1)
    hues = (base + rng.uniform(-0.15, 0.15, size=k) + (rng.random(k) < 0.35) * rng.uniform(0, 1, size=k)) % 1
    sats = rng.uniform(0.2, 0.85, size=k)
    return np.asarray([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, values)]) * 255


def _mix(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = t[..., None]
    return c0 * (1 - t) + c1 * t


def _rotated(grid: Grid, rng: np.random.Generator, cells: tuple[float, float]) -> Grid:
    """(u, v): the grid rotated by a random angle, scaled to `cells` pattern periods per image and
    shifted by a random phase."""
    x, y = grid
    a = rng.uniform(0, 2 * math.pi)
    f = rng.uniform(*cells)
    du, dv = rng.uniform(0, 10, size=2)
    return (x * math.cos(a) + y * math.sin(a)) * f + du, (-x * math.sin(a) + y * math.cos(a)) * f + dv


def _noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1] of n x n pixels with about `cells` bumps across."""
    small = Image.fromarray(rng.random((cells + 1, cells + 1)).astype(np.float32), mode="F")
    return np.clip(np.asarray(small.resize((n, n), Image.BICUBIC)), 0, 1)


def _turbulence(rng: np.random.Generator, n: int) -> np.ndarray:
    return sum(_noise(rng, n, 2 ** k) / 2 ** (k - 1) for k in range(1, 5)) / 2


def _table(rng: np.random.Generator, i: np.ndarray, j: np.ndarray, spread: float) -> np.ndarray:
    """A random shade per integer cell (i, j): bricks, cells and plates each get their own."""
    table = rng.uniform(1 - spread, 1 + spread, size=(64, 64))
    return table[i.astype(int) % 64, j.astype(int) % 64]


def brick_wall(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(grid, rng, (3, 7))
    row = np.floor(v)
    bu = u / 2 + 0.5 * (row % 2)  # bricks twice as long as high, every other course offset by half
    fx, fy = (bu % 1) * 2, v % 1
    mortar = rng.uniform(0.06, 0.14)
    joint = (fy < mortar) | (fx < mortar)
    brick, cement = _colours(rng, 2)
    shade = _table(rng, np.floor(bu), row, 0.18)
    out = brick * shade[..., None] * (0.9 + 0.2 * _noise(rng, n, 24))[..., None]
    out[joint] = cement * (0.85 + 0.3 * _noise(rng, n, 16)[joint, None])
    return out


def wood_grain(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, _ = _rotated(grid, rng, (4, 10))
    warp = _noise(rng, n, int(rng.integers(2, 5))) * rng.uniform(1, 3)
    rings = (u + warp) % 1
    t = rings ** rng.uniform(2, 5)  # slow light early wood, a sharp dark late-wood line
    light, dark = _colours(rng, 2)
    fibre = 0.92 + 0.16 * _noise(rng, n, 48)
    return _mix(light, dark, t) * fibre[..., None]


def basket_weave(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(grid, rng, (2.5, 4.5))
    across_u = ((np.floor(u) + np.floor(v)) % 2) == 0  # blocks alternate: strips along u, then along v
    strips = int(rng.integers(2, 4))  # at most ~13 strips across 64 px: finer ones alias into moire
    across = (np.where(across_u, v, u) * strips) % 1
    t = np.sin(math.pi * across) ** rng.uniform(0.3, 0.7)  # each strip rounded, dark in the gaps between
    strip, gap = _colours(rng, 2)
    fibre = 0.9 + 0.2 * _noise(rng, n, 40)
    return _mix(gap, strip, t) * fibre[..., None]


def honeycomb(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(grid, rng, (3, 7))
    s3 = math.sqrt(3)
    # nearest centre of a triangular lattice (two offset rectangular lattices): hexagonal cells
    a = np.stack([(u % 1) - 0.5, (v % s3) - s3 / 2])
    b = np.stack([((u - 0.5) % 1) - 0.5, ((v - s3 / 2) % s3) - s3 / 2])
    local = np.where((a ** 2).sum(0) < (b ** 2).sum(0), a, b)
    d = np.maximum.reduce([np.abs(local[0]), np.abs(0.5 * local[0] + s3 / 2 * local[1]),
                           np.abs(-0.5 * local[0] + s3 / 2 * local[1])])  # 0.5 on the cell's edge
    wall = rng.uniform(0.04, 0.09)
    inside, edge = _colours(rng, 2)
    fill = _mix(inside * 0.75, inside, np.clip(d / 0.5, 0, 1))  # cells darker in the middle: depth
    return np.where((d > 0.5 - wall)[..., None], edge, fill)


def fish_scales(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(grid, rng, (3, 6))
    radius = 0.5 * rng.uniform(1.0, 1.3)
    row0 = np.floor(v / 0.5)
    rho = np.full(u.shape, np.inf)
    for dr in (1, 0, -1):  # lower rows overlap the ones above: the first circle that holds a point wins
        row = row0 + dr
        cx = np.floor(u - 0.5 * (row % 2) + 0.5) + 0.5 * (row % 2)
        dist = np.hypot(u - cx, v - row * 0.5) / radius
        take = np.isinf(rho) & (dist < 1)
        rho[take] = dist[take]
    rho[np.isinf(rho)] = 1.0
    body, rim = _colours(rng, 2)
    out = _mix(body, body * 0.55 + rim * 0.45, rho ** 2)
    return np.where((rho > rng.uniform(0.86, 0.93))[..., None], rim, out)


def zigzag(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(grid, rng, (3, 7))
    tooth = rng.uniform(0.5, 1.5)
    tri = np.abs((u / tooth) % 2 - 1)  # a triangle wave: straight lines with sharp corners
    y = v + rng.uniform(0.4, 1.0) * tri
    colours = _colours(rng, int(rng.integers(2, 4)))
    return colours[np.floor(y * 2).astype(int) % len(colours)]


def plaid(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(grid, rng, (3, 5))
    base, warp, weft, line = _colours(rng, 4)

    def bands(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = w % 1
        wide = rng.uniform(0.2, 0.4)
        return f < wide, np.abs(f - rng.uniform(wide + 0.15, 0.9)) < 0.03

    wide_u, thin_u = bands(u)
    wide_v, thin_v = bands(v)
    out = np.broadcast_to(base, u.shape + (3,)).copy()
    out = np.where(wide_u[..., None], 0.5 * out + 0.5 * warp, out)  # crossing bands blend, as woven threads do
    out = np.where(wide_v[..., None], 0.5 * out + 0.5 * weft, out)
    return np.where((thin_u | thin_v)[..., None], line, out)


def waves(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(grid, rng, (3.5, 7))
    # gentle, long swells (steep short ones would read as a zigzag), with a ripple riding on them
    y = v + rng.uniform(0.1, 0.3) * np.sin(2 * math.pi * u / rng.uniform(1.8, 4) + rng.uniform(0, 2 * math.pi))
    y = y + 0.05 * np.sin(2 * math.pi * u * rng.uniform(2, 4))
    t = (0.5 + 0.5 * np.sin(2 * math.pi * y)) ** rng.uniform(0.6, 1.6)  # smooth crests and troughs
    crest, trough = _colours(rng, 2)
    return _mix(trough, crest, t)


def spiral(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    x, y = grid
    cx, cy = rng.uniform(-0.4, 0.4, size=2)  # the centre anywhere in the frame: a pattern, not an object
    r, theta = np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)
    arms = int(rng.integers(2, 7))
    turns = rng.uniform(7, 14) * (1 if rng.random() < 0.5 else -1)  # windings across the image, either hand
    t = 0.5 + 0.5 * np.tanh(3 * np.sin(arms * theta + 2 * math.pi * turns * r + rng.uniform(0, 2 * math.pi)))
    a, b = _colours(rng, 2)
    return _mix(a, b, t)


def cracked_earth(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    x, y = grid
    k = int(rng.integers(12, 40))
    seeds = rng.uniform(-0.6, 0.6, size=(k, 2))
    d = np.sqrt((x[None] - seeds[:, 0, None, None]) ** 2 + (y[None] - seeds[:, 1, None, None]) ** 2)
    near = np.partition(d, 1, axis=0)
    crack = (near[1] - near[0]) < rng.uniform(0.008, 0.02) * (1 + _noise(rng, n, 8))  # Voronoi edges, uneven
    cell = np.argmin(d, axis=0)
    mud, gap = _colours(rng, 2)
    shade = rng.uniform(0.8, 1.15, size=k)[cell] * (0.9 + 0.2 * _noise(rng, n, 20))
    return np.where(crack[..., None], gap * 0.6, mud * shade[..., None])


PATTERNS_BY_NAME: dict[str, Callable[[Grid, int, np.random.Generator], np.ndarray]] = {
    "brick wall": brick_wall, "wood grain": wood_grain, "basket weave": basket_weave, "honeycomb": honeycomb,
    "fish scales": fish_scales, "zigzag": zigzag, "plaid": plaid, "waves": waves, "spiral": spiral,
    "cracked earth": cracked_earth,
}


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    return registry_classes(NAME, PATTERNS_BY_NAME)


@lru_cache(maxsize=8)
def _grid(n: int) -> Grid:
    c = (np.arange(n) + 0.5) / n - 0.5
    x, y = np.meshgrid(c, c)
    x.flags.writeable = y.flags.writeable = False  # shared between images
    return x, y


def draw_pattern(label: int, index: int, split: str, domain: str, config: RenderConfig) -> Image.Image:
    rng = image_rng(NAME, config, split, DOMAINS.index(domain), label, index)
    n = config.image_size * SUPERSAMPLE
    rgb = PATTERNS_BY_NAME[class_names()[label]](_grid(n), n, rng)
    # light falls across the close-up from one side
    x, y = _grid(n)
    a = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0, 0.3) * (x * math.cos(a) + y * math.sin(a))
    return finish(rgb * light[..., None], config.image_size, rng, noise=rng.uniform(2, 8))


PATTERNS = RenderedSpec(NAME, DOMAINS, RENDER_VERSION, draw_pattern, class_names, RenderConfig())
