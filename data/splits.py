"""Deterministic train/test splits for datasets that ship none, and the identity of a split's files.

The seeded split (Caltech101, SUN397, EuroSAT, Office-Home, ImageNet-R): within each class, the
items sorted by key (relative path) are shuffled by `random.Random(f"{SPLIT_SEED}:{label}")`; the
first round(TEST_FRACTION * n) of them (at least one when the class has two or more) are `test`,
the rest `train`. It depends only on the files present, never on the machine or the run.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from pathlib import Path

from ..errors import UserError

SPLIT_SEED = 0
TEST_FRACTION = 0.2
SEEDED_SPLITS = ("train", "test")


def seeded_split(keys: list[str], labels: list[int], split: str, where: str) -> list[int]:
    """Indices (into keys) of the split's items, class by class, each class in key order."""
    if split not in SEEDED_SPLITS:
        raise UserError(f"{where}: no split '{split}'; this dataset has a seeded "
                        f"{round(100 * (1 - TEST_FRACTION))}/{round(100 * TEST_FRACTION)} split: use train or test")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    out: list[int] = []
    for y in sorted(by_class):
        items = sorted(by_class[y], key=lambda i: keys[i])
        random.Random(f"{SPLIT_SEED}:{y}").shuffle(items)
        n_test = max(1, round(len(items) * TEST_FRACTION)) if len(items) > 1 else 0
        out.extend(sorted(items[:n_test] if split == "test" else items[n_test:], key=lambda i: keys[i]))
    return out


def listing_key(prefix: str, base: Path, files: list[Path], labels: list[int]) -> str:
    """A split's identity: its files' paths (relative to base), labels, sizes and times."""
    lines = []
    for f, y in zip(files, labels):
        try:
            st = f.stat()
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:  # listed but missing: the loader reports it; the key still changes when it appears
            stamp = "missing"
        lines.append(f"{f.relative_to(base) if f.is_relative_to(base) else f}|{y}|{stamp}")
    return f"{prefix}:{base.resolve()}:{hashlib.sha256(chr(10).join(lines).encode()).hexdigest()}"


def files_key(prefix: str, data_files: list[Path], extra: str) -> str:
    """Identity of a split stored in a few data files (CIFAR's pickles, MNIST's idx files)."""
    stats = "\n".join(f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in data_files)
    return f"{prefix}:{hashlib.sha256((stats + chr(10) + extra).encode()).hexdigest()}"
