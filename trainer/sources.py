"""From a scenario to data: the global class vocabulary, each step's train and test images, and
batches of preprocessed tensors.

Classes are identified by (dataset, label index), numbered in order of first appearance in the
scenario; that numbering is the "global class index" used by methods, targets and logits.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from ..data.images import ImageSource, dataset_images, synthetic_images
from ..errors import UserError

log = logging.getLogger(__name__)

# Images of a step kept in memory as preprocessed tensors when they fit in this budget (bytes);
# larger steps stream through a DataLoader.
MEMORY_BUDGET = 2 * 1024 ** 3


@dataclass(frozen=True)
class Vocabulary:
    keys: tuple[tuple[str, int], ...]  # (dataset, label) per global class index
    names: tuple[str, ...]

    def index(self, dataset: str, label: int) -> int:
        return self.keys.index((dataset, label))


def vocabulary(scenario) -> Vocabulary:
    keys, names = [], []
    for step in scenario.steps:
        for label, name in zip(step.labels, step.classes):
            if (step.dataset, label) not in keys:
                keys.append((step.dataset, label))
                names.append(name)
    return Vocabulary(tuple(keys), tuple(names))


@dataclass(frozen=True)
class DataOptions:
    data_root: str | None = None
    download: bool = False
    synthetic_train_per_class: int = 40
    synthetic_test_per_class: int = 10
    eval_split: str = "test"  # "val": train and evaluate on the two parts of the training images


def step_source(step, split: str, opts: DataOptions) -> ImageSource:
    """The images of one step's classes and domain in one split, labels as dataset label indices.

    With `eval_split="val"` the test split is never read: "train" is 80% of each class's training
    images and "test" the other 20% (the seeded per-class split of data/splits.py), which is what
    hyperparameters are chosen on."""
    if opts.eval_split == "val":
        whole = _split_source(step, "train", opts)
        return carve(whole, "val" if split == "test" else "train")
    return _split_source(step, split, opts)


def _split_source(step, split: str, opts: DataOptions) -> ImageSource:
    from ..data.rendered import RENDERED

    if step.dataset in RENDERED:  # rendered: only the step's classes, as many per class as asked
        n = opts.synthetic_train_per_class if split == "train" else opts.synthetic_test_per_class
        return synthetic_images(step.dataset, split, step.domain, n, classes=list(step.classes))
    full = dataset_images(step.dataset, split, step.domain if step.domain != "default" else None,
                          opts.data_root, None, download=opts.download)
    return subset(full, set(step.labels))


def subset(src: ImageSource, labels: set[int]) -> ImageSource:
    if src.labels is None:
        raise ValueError("a step's images need labels")
    picks = [i for i, y in enumerate(src.labels) if y in labels]
    if len(picks) == len(src):
        return src
    return _picked(src, picks, f"subset:{hashlib.sha256(','.join(map(str, sorted(labels))).encode()).hexdigest()[:16]}")


def carve(src: ImageSource, part: str) -> ImageSource:
    """The "train" (80%) or "val" (20%) part of a training split, per class, seeded by the images'
    keys alone: the same carve on every machine and in every run."""
    from ..data.splits import seeded_split

    if src.labels is None:
        raise ValueError("a step's images need labels")
    picks = seeded_split(src.keys, src.labels, "test" if part == "val" else "train",
                         f"{src.dataset}/{src.split}")
    return _picked(src, picks, f"carve-{part}", split=f"{src.split}:{part}")


def _picked(src: ImageSource, picks: list[int], tag: str, split: str | None = None) -> ImageSource:
    inner = src.loader
    key = f"{src.cache_key}:{tag}" if src.cache_key else None
    return ImageSource([src.keys[i] for i in picks], lambda j: inner(picks[j]), [src.labels[i] for i in picks],
                       src.classes, src.dataset, split or src.split, src.domain, key)


class TensorImages(torch.utils.data.Dataset):
    """(preprocessed image, global target, position) per image of a source."""

    def __init__(self, source: ImageSource, preprocess, targets: torch.Tensor):
        self.source, self.preprocess, self.targets = source, preprocess, targets

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            image = self.source.load(i)
        except Exception as exc:  # PIL raises many kinds for broken files
            raise unreadable(self.source, [i], exc) from None
        return self.preprocess(image), self.targets[i], i


def cached_features(source: ImageSource, spec, device: str = "cpu", progress=None) -> torch.Tensor:
    """Frozen CLIP image features [N, D] of a cacheable source: encoded once, then read from the
    on-disk cache (backbones/features.py). An unreadable image is an error, as on the image path."""
    from ..backbones.features import image_features

    if source.cache_key is None:
        raise UserError(f"{source.dataset}/{source.split} cannot be cached; this method needs cached features")
    fs = image_features(source, spec, device=device, progress=progress)
    if not fs.valid.all():
        raise unreadable(source, [int(i) for i in (~fs.valid).nonzero()[0]])
    return torch.from_numpy(fs.features)


def unreadable(source: ImageSource, bad: list[int], exc: Exception | None = None) -> UserError:
    """A training or test set must be readable whole: a skipped image would silently change the
    test sizes that runs are compared on."""
    why = f" ({str(exc).splitlines()[0][:120]})" if exc is not None and str(exc) else ""
    return UserError(f"{len(bad)} image(s) of {source.dataset}/{source.split} cannot be read, e.g. "
                     f"{source.keys[bad[0]]}{why}; fix or remove them")


def global_targets(source: ImageSource, vocab: Vocabulary) -> torch.Tensor:
    lookup = {key: g for g, key in enumerate(vocab.keys)}
    return torch.tensor([lookup[(source.dataset, y)] for y in source.labels], dtype=torch.long)


def materialise(dataset: TensorImages, progress=None, task: str = "load") -> torch.Tensor | None:
    """All images of a small step as one tensor (rendered/decoded once for every epoch), or None
    when they would not fit the memory budget."""
    n = len(dataset)
    if n == 0:
        return None
    first = dataset[0][0]
    if n * first.numel() * first.element_size() > MEMORY_BUDGET:
        return None
    out = torch.empty((n, *first.shape), dtype=first.dtype)
    out[0] = first
    if progress:
        progress.start(task, f"loading {dataset.source.dataset}/{dataset.source.split}/{dataset.source.domain}", n)
        progress.advance(task, 1)
    for i in range(1, n):
        out[i] = dataset[i][0]
        if progress:
            progress.advance(task, 1)
    if progress:
        progress.stop(task)
    return out
