"""Where images come from: files and folders named on the command line, or a dataset split.

Every source gives, per index, a stable key (a path, or dataset/split/domain/index), a loader
that raises on unreadable images (the caller reports and skips them), and a label when known.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .registry import IMAGE_SUFFIXES, known_datasets

SYNTHETIC_TEST_PER_CLASS = 10


@dataclass
class ImageSource:
    keys: list[str]
    loader: object  # callable(i) -> PIL.Image (RGB)
    labels: list[int] | None = None
    classes: list[str] | None = None
    dataset: str | None = None
    split: str | None = None
    domain: str | None = None
    cache_key: str | None = None  # identity of a dataset split's images; None: not cacheable

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int):
        return self.loader(i)


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def image_files(paths: list[Path]) -> ImageSource:
    """Files as given, folders expanded recursively to their images (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise UserError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"{p} not found; name image files or folders of images")
    return ImageSource([str(f) for f in files], lambda i: _open_rgb(files[i]))


def image_folder(root: Path, split: str | None) -> ImageSource:
    """torchvision's ImageFolder layout, root/<class>/<image>; root/<split>/ is used when present."""
    base = root / split if split and (root / split).is_dir() else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{base} has no class folders; expected {base}/<class>/<image>.jpg")
    files, labels = [], []
    for label, c in enumerate(classes):
        found = sorted(f for f in (base / c).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        files.extend(found)
        labels.extend([label] * len(found))
    # The files' names, sizes and times identify the split: edit one and its cache entry is new.
    listing = "\n".join(f"{f.relative_to(base)}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in files)
    key = f"folder:{base.resolve()}:{hashlib.sha256(listing.encode()).hexdigest()}"
    return ImageSource([str(f) for f in files], lambda i: _open_rgb(files[i]), labels,
                       [c.replace("_", " ") for c in classes], root.name, split, None, key)


def synthetic_images(name: str, split: str, domain: str | None, n_per_class: int,
                     classes: list[str] | None = None, limit: int | None = None) -> ImageSource:
    """A split of a rendered dataset (rendered.RENDERED: `synthetic`, `synthetic-digits`, ...),
    optionally of some classes. A whole split is cacheable: its images are rendered once, on first
    use, into the on-disk render cache (render_cache.py) and read from there afterwards."""
    from .render_base import RenderedDataset
    from .render_cache import CachedRenders
    from .rendered import RENDERED

    spec = RENDERED[name]
    domain = domain or spec.domains[0]
    if domain not in spec.domains:
        raise UserError(f"unknown {name} domain '{domain}'; use {', '.join(spec.domains)}")
    ds = RenderedDataset(spec, split, domain, n_per_class=n_per_class, classes=classes)
    n = len(ds) if limit is None else min(limit, len(ds))
    labels = [ds.labels[i // n_per_class] for i in range(len(ds))]
    if n == len(ds):  # a whole split, in index order: row i of the cache is image i
        key = ds.cache_key()
        return ImageSource([f"{name}/{split}/{domain}/{i}" for i in range(n)], CachedRenders(key, n, ds.image),
                           labels, ds.classes, name, split, domain, key)
    # a limit is spread over the classes, and rendered directly: a few images are not worth a file
    order = sorted(range(len(ds)), key=lambda i: (i % n_per_class, i // n_per_class))[:n]
    return ImageSource([f"{name}/{split}/{domain}/{i}" for i in order], lambda j: ds.image(order[j]),
                       [labels[i] for i in order], ds.classes, name, split, domain, None)


def dataset_images(name: str, split: str = "test", domain: str | None = None, data_root: Path | None = None,
                   limit: int | None = None, download: bool = False) -> ImageSource:
    """A dataset split, labels in the registry's class order (data/names/<name>.txt).

    The rendered datasets (`synthetic`, `synthetic-digits`, ...) are drawn; an ImageFolder root is
    read as is; a registry dataset is read from data_root/<name>/ (default ./data-root): an
    ImageFolder layout [<domain>/]<split>/<class>/, the dataset's official layout (layouts.py), or
    torchvision's (torchvision_sets.py, which downloads when `download` is set)."""
    from .rendered import RENDERED

    if name in RENDERED:
        return synthetic_images(name, split, domain, SYNTHETIC_TEST_PER_CLASS, limit=limit)
    if Path(name).is_dir():
        return _limited(image_folder(Path(name), split), limit)
    if name not in known_datasets():
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(known_datasets())}, or an ImageFolder root")
    from .layouts import layout_images, missing_message, resolve_domain
    from .torchvision_sets import TORCHVISION_SETS, torchvision_images

    base = Path(data_root or "data-root") / name
    domain = resolve_domain(name, domain)
    src = layout_images(name, split, domain, base)
    if src is None and name in TORCHVISION_SETS:
        src = torchvision_images(name, split, domain, base, download)
    if src is None:
        raise UserError(missing_message(name, split, domain, base) +
                        (" (--download fetches only torchvision's datasets)" if download else ""))
    return _limited(src, limit)


def _limited(src: ImageSource, limit: int | None) -> ImageSource:
    if limit is None or limit >= len(src):
        return src
    step = len(src) / limit  # evenly over the (class-sorted) items, so every class shows up
    picks = [int(i * step) for i in range(limit)]
    inner = src.loader
    return ImageSource([src.keys[i] for i in picks], lambda j: inner(picks[j]),
                       [src.labels[i] for i in picks] if src.labels else None, src.classes,
                       src.dataset, src.split, src.domain)
