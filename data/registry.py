"""Class and domain names by dataset: the registry in datasets.yaml, a classes file, or an ImageFolder.

Names are facts: the registry files keep each dataset's label-index order, so class i of a pool is
label i of the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import UserError

DATA_DIR = Path(__file__).parent
NAMES_DIR = DATA_DIR / "names"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class NameSet:
    """What to ask the LLM about: a dataset's classes (index order) and domains (image styles)."""

    dataset: str
    classes: tuple[str, ...]
    domains: tuple[str, ...] = ()
    context: str = ""
    class_ids: tuple[str, ...] = field(default=(), compare=False)  # e.g. wnids, when the files have them


@lru_cache(maxsize=1)
def _registry() -> dict[str, dict]:
    with open(DATA_DIR / "datasets.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def known_datasets() -> list[str]:
    return sorted(_registry())


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read classes file {path}: {exc.strerror if isinstance(exc, OSError) else exc}; "
                        "give a UTF-8 text file with one class name per line") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _split_ids(lines: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Lines are `name` or `id<TAB>name`; returns (names, ids)."""
    if lines and all("\t" in ln for ln in lines):
        ids, names = zip(*(ln.split("\t", 1) for ln in lines))
        return tuple(n.strip() for n in names), tuple(i.strip() for i in ids)
    return tuple(lines), ()


def _check_unique(names: tuple[str, ...], where: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n.lower() in seen:
            raise UserError(f"class '{n}' appears twice in {where}; class names must be unique")
        seen.add(n.lower())


def load_dataset_names(name: str) -> NameSet:
    reg = _registry()
    if name not in reg:
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(known_datasets())} "
                        "(or pass --classes FILE, or an ImageFolder root as --dataset)")
    entry = reg[name]
    classes, ids = _split_ids(_read_lines(NAMES_DIR / entry["classes"]))
    return NameSet(name, classes, tuple(entry.get("domains") or ()), entry.get("context", ""), ids)


def image_folder_names(root: Path) -> NameSet:
    """torchvision's ImageFolder convention: one sub-folder per class, sorted; '_' reads as a space."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(f"{root} has no class sub-folders; an ImageFolder root holds one folder per class "
                        "(root/<class>/<image>.jpg)")
    return NameSet(root.name, tuple(d.name.replace("_", " ") for d in dirs), (), "", tuple(d.name for d in dirs))


def resolve_names(dataset: str | None, classes_file: Path | None = None,
                  domains: list[str] | None = None) -> NameSet:
    """The CLI's rules: a registry name, an ImageFolder root, or a classes file; --domains overrides."""
    if classes_file is not None:
        classes, ids = _split_ids(_read_lines(Path(classes_file)))
        if not classes:
            raise UserError(f"classes file {classes_file} lists no class names; write one name per line")
        names = NameSet(dataset or Path(classes_file).stem, classes, (), "", ids)
    elif dataset is None:
        raise UserError("name a dataset: --dataset NAME (known: " + ", ".join(known_datasets()) +
                        "), an ImageFolder root, or --classes FILE")
    elif dataset in _registry():
        names = load_dataset_names(dataset)
    elif Path(dataset).is_dir():
        names = image_folder_names(Path(dataset))
    else:
        load_dataset_names(dataset)  # raises the unknown-dataset error
        raise AssertionError("unreachable")
    if domains is not None:
        names = NameSet(names.dataset, names.classes, tuple(d.strip() for d in domains if d.strip()),
                        names.context, names.class_ids)
    _check_unique(names.classes, f"dataset {names.dataset}")
    return names
