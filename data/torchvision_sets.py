"""Registry datasets that torchvision ships, read (or downloaded) through torchvision.datasets.

Each lives in torchvision's own layout under data_root/<name>/ (for example
data_root/cifar100/cifar-100-python/); a torchvision root shared with other projects, where the
same folder sits directly under data_root, is read too. torchvision's labels are mapped to the
registry's class order by name (classmap.py). Caltech101, SUN397 and EuroSAT ship no split: they
get the seeded 80/20 split of splits.py. Oxford-IIIT Pet's `train` is its `trainval`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .classmap import class_map
from .images import ImageSource
from .registry import load_dataset_names
from .splits import TEST_FRACTION, files_key, listing_key, seeded_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchvisionSet:
    cls: str  # the torchvision.datasets class
    folder: str  # the folder torchvision reads under its root
    layout: str  # what that folder holds (for messages)
    splits: dict | None  # our split name -> constructor arguments; None: no split shipped (seeded)
    scipy: bool = False  # reads .mat files
    kwargs: dict = field(default_factory=dict)


def _native(*names: str) -> dict:
    return {s: {"split": s} for s in names}


_TRAIN_FLAG = {"train": {"train": True}, "test": {"train": False}}

TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "cifar100": TorchvisionSet("CIFAR100", "cifar-100-python", "{train,test,meta}", _TRAIN_FLAG),
    "mnist": TorchvisionSet("MNIST", "MNIST", "raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", _TRAIN_FLAG),
    "flowers102": TorchvisionSet("Flowers102", "flowers-102", "{jpg/,imagelabels.mat,setid.mat}",
                                 _native("train", "val", "test"), scipy=True),
    "food101": TorchvisionSet("Food101", "food-101", "{images/,meta/}", _native("train", "test")),
    "dtd": TorchvisionSet("DTD", "dtd", "dtd/{images/,labels/}", _native("train", "val", "test")),
    "eurosat": TorchvisionSet("EuroSAT", "eurosat", "2750/<Class>/<image>", None),
    "oxford_pet": TorchvisionSet("OxfordIIITPet", "oxford-iiit-pet", "{images/,annotations/}",
                                 {"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "stanford_cars": TorchvisionSet("StanfordCars", "stanford_cars",
                                    "{devkit/,cars_train/,cars_test/,cars_test_annos_withlabels.mat}",
                                    _native("train", "test"), scipy=True),
    "aircraft": TorchvisionSet("FGVCAircraft", "fgvc-aircraft-2013b", "data/{variants.txt,images/,...}",
                               _native("train", "val", "trainval", "test"), kwargs={"annotation_level": "variant"}),
    "caltech101": TorchvisionSet("Caltech101", "caltech101", "101_ObjectCategories/<class>/", None),
    "sun397": TorchvisionSet("SUN397", "SUN397", "{ClassName.txt,<letter>/<class>/}", None),
}


def torchvision_images(name: str, split: str, domain: str | None, base: Path, download: bool = False) -> ImageSource:
    """The split of torchvision dataset `name`, read from base (data_root/<name>) or its parent."""
    spec = TORCHVISION_SETS[name]
    if spec.splits is not None and split not in spec.splits:
        raise UserError(f"dataset {name} has no split '{split}'; use {', '.join(spec.splits)}")
    root = base if (base / spec.folder).exists() or not (base.parent / spec.folder).exists() else base.parent
    ds = _construct(name, spec, root, base, dict(spec.splits[split]) if spec.splits else {}, download)
    where = f"dataset {name} at {root / spec.folder}"
    cmap = class_map(name)
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    if names:
        remap = cmap.map_all([str(n) for n in names], where)
    else:  # Flowers102 has no names: its labels are the official indices the registry follows
        remap = list(range(len(cmap.classes)))
    targets = _targets(ds)
    if targets and max(targets) >= len(remap):
        raise UserError(f"{where}: label {max(targets)} has no class name ({len(remap)} known); "
                        "the copy is incomplete: fetch it again")
    labels = [remap[t] for t in targets]
    files = _files(ds)
    if files is None:  # in memory (CIFAR, MNIST): the index is the key
        picks = list(range(len(labels)))
        keys = [f"{name}/{split}/{i}" for i in picks]
        data_files = sorted(p for p in (root / spec.folder).rglob("*") if p.is_file())
        key = files_key(f"tv:{name}:{split}", data_files, f"{len(labels)}|{','.join(map(str, remap))}")
    else:
        rel = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files]
        picks = seeded_split(rel, labels, split, where) if spec.splits is None else \
            sorted(range(len(files)), key=lambda i: (labels[i], rel[i]))
        keys = [str(files[i]) for i in picks]
        protocol = f"seeded{TEST_FRACTION}" if spec.splits is None else "native"
        key = listing_key(f"tv:{name}:{split}:{protocol}", root, [files[i] for i in picks], [labels[i] for i in picks])
    return ImageSource(keys, lambda j: ds[picks[j]][0].convert("RGB"), [labels[i] for i in picks],
                       list(load_dataset_names(name).classes), name, split, domain, key)


def _construct(name: str, spec: TorchvisionSet, root: Path, base: Path, split_args: dict, download: bool):
    where = f"{root / spec.folder}/{spec.layout}"
    missing = UserError(f"dataset {name} not found: expected torchvision's layout {where} "
                        f"(or {base}/<split>/<class>/<image>); pass --data-root DIR (the folder holding {name}/), "
                        "or --download to fetch it")
    if not download and not (root / spec.folder).exists():
        raise missing  # before torchvision, which creates folders for some datasets
    if spec.scipy and importlib.util.find_spec("scipy") is None:
        raise UserError(f"dataset {name} needs scipy to read its .mat files: pip install scipy")
    from .. import torchvision_fix  # noqa: F401 - before torchvision: its compiled ops may not load

    import torchvision.datasets as tvd

    try:
        if download:
            log.info("downloading %s to %s (skipped when already there)", name, root)
        return getattr(tvd, spec.cls)(str(root), download=download, **spec.kwargs, **split_args)
    except (RuntimeError, OSError, ValueError) as exc:
        if download:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot download dataset {name} to {root}: {reason}; "
                            f"put a copy there by hand ({where})") from None
        raise missing from None


def _targets(ds) -> list[int]:
    for attr in ("targets", "_labels", "y"):
        values = getattr(ds, attr, None)
        if values is not None:
            return [int(t) for t in (values.tolist() if hasattr(values, "tolist") else values)]
    return [int(t) for _, t in ds._samples]  # StanfordCars


def _files(ds) -> list[Path] | None:
    if type(ds).__name__ == "Caltech101":
        folder = Path(ds.root) / "101_ObjectCategories"
        return [folder / ds.categories[y] / f"image_{i:04d}.jpg" for y, i in zip(ds.y, ds.index)]
    for attr in ("_image_files", "_images"):
        if hasattr(ds, attr):
            return [Path(p) for p in getattr(ds, attr)]
    for attr in ("samples", "_samples"):
        if hasattr(ds, attr):
            return [Path(p) for p, _ in getattr(ds, attr)]
    return None
