"""Rendered splits kept on disk: a split is drawn once into a uint8 array [N, H, W, 3], written
atomically under <cache dir>/renders/, and memory-mapped by every later run and process.

Rendering costs CPU every time; the trainer renders each step's train and test images per run, and
a benchmark runs the same images many times. Nothing is read or drawn until the first image is
asked for, so building image sources stays cheap. Two processes that miss at the same time both
render and both rename a complete file into place: readers never see half a file, and either copy
is the same array.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..common import atomic_path, cache_dir

log = logging.getLogger(__name__)

# One lock per key in this process: atomic_path's temporary file is named by process id, so two
# threads must not write one key at once (the second simply reads what the first wrote).
_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


def render_path(key: str) -> Path:
    return cache_dir() / "renders" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"


class CachedRenders:
    """Image i of a split whose identity is `key` and whose images `draw(i)` renders, from the cache."""

    def __init__(self, key: str, count: int, draw: Callable[[int], Image.Image]):
        self.key, self.count, self._draw = key, count, draw
        self._array: np.ndarray | None = None

    def __call__(self, i: int) -> Image.Image:
        # a copy: the image must not keep the memory map (or the page it lies on) alive
        return Image.fromarray(np.array(self.array()[i]))

    def array(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        with _key_lock(self.key):
            if self._array is None:
                loaded = self._load()
                self._array = self._render() if loaded is None else loaded
            return self._array

    def _load(self) -> np.ndarray | None:
        path = render_path(self.key)
        if not path.exists():
            return None
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:  # truncated by hand, or not ours: draw it again
            log.warning("re-rendering %s: unreadable cache file %s (%s)", self.key, path, exc)
            return None
        if array.dtype != np.uint8 or array.ndim != 4 or len(array) != self.count or array.shape[3] != 3:
            log.warning("re-rendering %s: cache file %s holds %s %s", self.key, path, array.dtype, array.shape)
            return None
        return array

    def _render(self) -> np.ndarray:
        first = np.asarray(self._draw(0).convert("RGB"))
        array = np.empty((self.count, *first.shape), np.uint8)
        array[0] = first
        for i in range(1, self.count):
            array[i] = np.asarray(self._draw(i).convert("RGB"))
        path = render_path(self.key)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array)
        except OSError as exc:  # a read-only or full cache costs speed, never the run
            log.warning("cannot cache rendered images in %s: %s", path.parent, exc)
        return array
