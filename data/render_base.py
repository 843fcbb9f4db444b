"""What every rendered dataset shares: its registry entry (`RenderedSpec`), seeded per-image random
streams, and the split object that turns (split, domain, classes, n per class) into labelled images.

A rendered dataset is one `RenderedSpec`: its name, domains, render version and a `draw` function
that makes one image from (label, index, split, domain, config). Every image is a pure function of
those and the config's seed, so any subset renders identically in any order. The registry of all
rendered datasets is `rendered.RENDERED`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from .registry import load_dataset_names

# One random stream per split; pretrain is uniil-micro's own images (backbones/micro_train.py).
SPLIT_STREAMS = {"train": 0, "test": 1, "val": 2, "pretrain": 3}


@dataclass(frozen=True)
class RenderConfig:
    """The settings of the renderers that have no others (digits, patterns). Its repr is part of a
    split's cache key, so a changed field is a new split."""

    image_size: int = 64
    seed: int = 0


# draw(label, index, split, domain, config) -> an RGB image of config.image_size pixels
Draw = Callable[[int, int, str, str, Any], Image.Image]


@dataclass(frozen=True)
class RenderedSpec:
    """A rendered dataset: a registry entry in data/datasets.yaml (class names, context) plus how to
    draw its images. Bump `version` whenever `draw` changes a pixel: it keys cached renders and
    cached features, which would otherwise be stale."""

    name: str
    domains: tuple[str, ...]
    version: int
    draw: Draw
    classes: Callable[[], tuple[str, ...]]  # label-index order, data/names/<name>.txt
    config: Any = RenderConfig()  # the default; a frozen dataclass with image_size and seed


def registry_classes(name: str, known: set[str] | dict) -> tuple[str, ...]:
    """The dataset's classes from the registry, checked against what its renderer can draw: the
    names file is the label order, the renderer only knows names."""
    names = load_dataset_names(name).classes
    mismatch = set(names) ^ set(known)
    assert not mismatch, f"renderer and data/names of {name} disagree on {mismatch}"
    return names


def image_rng(name: str, config: Any, split: str, domain_index: int, label: int, index: int) -> np.random.Generator:
    """The random stream of one image of a dataset other than `synthetic`/`synthetic-colours`
    (whose historical keys live in synthetic.py). The name's checksum leads the key, so two
    datasets never draw the same numbers for the same (split, domain, label, index)."""
    salt = zlib.crc32(name.encode())
    key = [salt, config.seed, SPLIT_STREAMS[split], domain_index, label, index]
    return np.random.default_rng(np.random.SeedSequence(key))


class RenderedDataset:
    """`n_per_class` images of each class of a rendered dataset in one domain and split; items are
    (PIL image, label). Image i is index i % n_per_class of class labels[i // n_per_class]."""

    def __init__(self, spec: RenderedSpec, split: str = "train", domain: str | None = None, n_per_class: int = 20,
                 classes: list[str] | None = None, config: Any = None):
        domain = domain or spec.domains[0]
        if split not in SPLIT_STREAMS:
            raise ValueError(f"unknown split {split!r}; use {', '.join(SPLIT_STREAMS)}")
        if domain not in spec.domains:
            raise ValueError(f"unknown domain {domain!r} of {spec.name}; use {', '.join(spec.domains)}")
        self.spec, self.split, self.domain, self.n_per_class = spec, split, domain, n_per_class
        self.config = spec.config if config is None else config
        self.classes = list(spec.classes())
        self.labels = [self.classes.index(c) for c in (classes or self.classes)]
        self.subset = classes is not None

    def __len__(self) -> int:
        return len(self.labels) * self.n_per_class

    def _item(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.labels[i // self.n_per_class], i % self.n_per_class

    def image(self, i: int) -> Image.Image:
        label, k = self._item(i)
        return self.spec.draw(label, k, self.split, self.domain, self.config)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.image(i), self._item(i)[0]

    def cache_key(self) -> str:
        """The identity of this split's images (cached renders and features are keyed by it): the
        dataset, its render version, the config, the size, split, domain and the class subset."""
        # Named classes are listed even when they are all of them: the keys that synthetic's cached
        # features were stored under have always been written this way.
        which = ":" + ",".join(map(str, self.labels)) if self.subset else ""
        return (f"{self.spec.name}:render-v{self.spec.version}:{self.config}:n{self.n_per_class}:"
                f"{self.split}:{self.domain}{which}")


def finish(gray_or_rgb: np.ndarray, size: int, rng: np.random.Generator, noise: float) -> Image.Image:
    """A float image in 0..255 (H x W or H x W x 3, supersampled or not) as an RGB image of `size`
    pixels with Gaussian sensor noise: the last step the new renderers share."""
    arr = np.clip(gray_or_rgb, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    if noise > 0:
        noisy = np.asarray(img, np.float32) + rng.normal(0, noise, size=(size, size, 1 if arr.ndim == 2 else 3))
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return img
