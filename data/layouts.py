"""Registry datasets read from folders of image files, labels in the registry's class order.

Under data_root/<name>/ (or one folder deeper, e.g. the archive's own tiny-imagenet-200/):
- any dataset: the ImageFolder layout [<domain>/]<split>/<class>/<image>;
- domainnet: the official <domain>/<class>/<image> with <domain>_train.txt and <domain>_test.txt;
- office-home: the official <Domain>/<Class>/<image>, split 80/20 by seed (see splits.py);
- imagenet-r: the official <wnid>/<image>, split 80/20 by seed; its renditions are mixed in every
  class folder, as the benchmark uses them, so a domain does not filter its images;
- tinyimagenet: the official train/<wnid>/images/*.JPEG, and val/images/ with val/val_annotations.txt
  as the `test` split (the official test images carry no labels).
Class folders map to registry classes by wnid or by normalised name (classmap.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .classmap import class_map, normalise
from .images import ImageSource, _open_rgb
from .registry import IMAGE_SUFFIXES, load_dataset_names
from .splits import TEST_FRACTION, listing_key, seeded_split

DOMAIN_DATASETS = {"domainnet", "office-home"}  # a domain selects their images

OFFICIAL = {
    "domainnet": ("{domain}/<class>/<image> with {domain}_{split}.txt",
                  "the domain zips and split files from http://ai.bu.edu/M3SDA/"),
    "office-home": ("{domain}/<class>/<image> (80/20 split by seed)",
                    "OfficeHomeDataset_10072016 from https://www.hemanthdv.org/officeHomeDataset.html"),
    "imagenet-r": ("<wnid>/<image> (80/20 split by seed)",
                   "imagenet-r.tar from https://github.com/hendrycks/imagenet-r"),
    "tinyimagenet": ("train/<wnid>/images/*.JPEG and val/images/ with val/val_annotations.txt",
                     "tiny-imagenet-200.zip from http://cs231n.stanford.edu/"),
}


def resolve_domain(name: str, domain: str | None) -> str | None:
    """The registry's first domain when none is given (as scenario files do); a known one otherwise."""
    domains = load_dataset_names(name).domains
    if domain is None:
        return domains[0] if domains else None
    if name in DOMAIN_DATASETS and normalise(domain) not in {normalise(d) for d in domains}:
        raise UserError(f"unknown domain '{domain}' of dataset {name}; known: {', '.join(domains)}")
    return domain


def layout_images(name: str, split: str, domain: str | None, base: Path) -> ImageSource | None:
    """The split read from files under base (data_root/<name>), or None when no known layout is there."""
    official = {"domainnet": _domainnet, "office-home": _office_home, "imagenet-r": _imagenet_r,
                "tinyimagenet": _tinyimagenet}.get(name)
    # DomainNet has a class `train` and TinyImageNet a `test` folder of unlabelled images: their
    # official layouts are recognised first, by their split files.
    if official and name in ("domainnet", "tinyimagenet"):
        return official(name, split, domain, base) or _split_folders(name, split, domain, base)
    src = _split_folders(name, split, domain, base)
    return src or (official(name, split, domain, base) if official else None)


def missing_message(name: str, split: str, domain: str | None, base: Path) -> str:
    where = f"{base}/{domain + '/' if name in DOMAIN_DATASETS else ''}{split}/<class>/<image>"
    layout, source = OFFICIAL.get(name, (None, None))
    expected = f"{base}/{layout.format(domain=domain, split=split)} or {where}" if layout else where
    get = f"get {source} and " if source else ""
    return (f"dataset {name} ({split}{', ' + domain if domain and name in DOMAIN_DATASETS else ''}) not found: "
            f"expected {expected}; {get}pass --data-root DIR (the folder holding {name}/)")


def _child(folder: Path, name: str) -> Path | None:
    """The sub-folder named `name`, compared normalised (Real World, Real_World, real world)."""
    if not folder.is_dir():
        return None
    return next((d for d in sorted(folder.iterdir()) if d.is_dir() and normalise(d.name) == normalise(name)), None)


def _find_root(base: Path, ok) -> Path | None:
    """base, or its one sub-folder where the archive unpacked (tiny-imagenet-200/), that passes ok."""
    if not base.is_dir():
        return None
    if ok(base):
        return base
    return next((d for d in sorted(base.iterdir()) if d.is_dir() and not d.name.startswith(".") and ok(d)), None)


def _images_under(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def _class_folders(folder: Path, name: str) -> tuple[list[Path], list[int]]:
    """Images of folder/<class>/..., labels by registry index, class by class."""
    dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    labels = class_map(name).map_all([d.name for d in dirs], f"dataset {name} at {folder}")
    files, ys = [], []
    for y, d in sorted(zip(labels, dirs)):
        found = _images_under(d)
        files.extend(found)
        ys.extend([y] * len(found))
    return files, ys


def _source(name, split, domain, base, files, labels, kind) -> ImageSource:
    key = listing_key(f"{kind}:{name}:{split}", base, files, labels)
    return ImageSource([str(f) for f in files], lambda i: _open_rgb(files[i]), labels,
                       list(load_dataset_names(name).classes), name, split, domain, key)


def _split_folders(name, split, domain, base) -> ImageSource | None:
    candidates = [_child(base, domain)] if domain else []
    if name not in DOMAIN_DATASETS:
        candidates.append(base)
    for root in filter(None, candidates):
        folder = root / split
        if folder.is_dir() and any(d.is_dir() for d in folder.iterdir()):
            files, labels = _class_folders(folder, name)
            return _source(name, split, domain, folder, files, labels, "folder")
    return None


def _seeded(name, split, domain, folder: Path) -> ImageSource:
    files, labels = _class_folders(folder, name)
    picks = seeded_split([str(f.relative_to(folder)) for f in files], labels, split, f"dataset {name}")
    files, labels = [files[i] for i in picks], [labels[i] for i in picks]
    return _source(name, split, domain, folder, files, labels, f"seeded{TEST_FRACTION}")


def _domainnet(name, split, domain, base) -> ImageSource | None:
    root = _find_root(base, lambda r: (r / f"{domain}_{split}.txt").is_file())
    if root is None:
        return None
    rows = [ln.split()[0] for ln in (root / f"{domain}_{split}.txt").read_text(encoding="utf-8").splitlines()
            if ln.strip()]
    folders = sorted({Path(r).parts[1] for r in rows})
    index = dict(zip(folders, class_map(name).map_all(folders, f"dataset {name} at {root}")))
    pairs = sorted((index[Path(r).parts[1]], r) for r in rows)
    files, labels = [root / r for _, r in pairs], [y for y, _ in pairs]
    return _source(name, split, domain, root, files, labels, "split-file")


def _office_home(name, split, domain, base) -> ImageSource | None:
    root = _find_root(base, lambda r: _child(r, domain) is not None)
    return _seeded(name, split, domain, _child(root, domain)) if root else None


def _imagenet_r(name, split, domain, base) -> ImageSource | None:
    wnid = re.compile(r"n\d{8}")
    root = _find_root(base, lambda r: any(d.is_dir() and wnid.fullmatch(d.name) for d in r.iterdir()))
    return _seeded(name, split, domain, root) if root else None


def _tinyimagenet(name, split, domain, base) -> ImageSource | None:
    root = _find_root(base, lambda r: (r / "val" / "val_annotations.txt").is_file() and (r / "train").is_dir())
    if root is None:
        return None
    if split == "train":
        files, labels = _class_folders(root / "train", name)
        return _source(name, split, domain, root, files, labels, "tinyimagenet")
    if split not in ("test", "val"):
        raise UserError(f"dataset {name} has splits train and test (the official val images; "
                        f"its test images carry no labels), not '{split}'")
    rows = [ln.split("\t")[:2] for ln in (root / "val" / "val_annotations.txt").read_text().splitlines() if ln.strip()]
    wnids = sorted({w for _, w in rows})
    index = dict(zip(wnids, class_map(name).map_all(wnids, f"dataset {name} at {root / 'val'}")))
    pairs = sorted((index[w], f) for f, w in rows)
    files, labels = [root / "val" / "images" / f for _, f in pairs], [y for y, _ in pairs]
    return _source(name, split, domain, root, files, labels, "tinyimagenet")
