"""From the class names (or wnids) a dataset's files use to the registry's label indices.

On-disk copies name classes their own way: `aquarium_fish`, `Alarm_Clock`, `n01443537`,
`AnnualCrop`. A name matches a registry class when both read the same after `normalise` (lower
case, every run of other characters than letters and digits a single space), when it is the
class's id (wnid), or through a dataset's alias table for the few names the registry rewrote.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..errors import UserError
from .registry import load_dataset_names

# Names the registry rewrote (CLIP's prompt-friendly names); keys are the files' names.
ALIASES: dict[str, dict[str, str]] = {
    "caltech101": {
        "Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard",
        "Motorbikes": "motorbike", "airplanes": "airplane", "car_side": "side of a car",
        "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
        "crocodile_head": "head of a crocodile", "flamingo_head": "head of a flamingo",
        "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol",
    },
    "eurosat": {
        "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
        "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
        "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
        "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
    },
}


def normalise(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", name.lower()).strip()


class ClassMap:
    """Registry label index of a name, wnid or alias of one dataset's classes."""

    def __init__(self, dataset: str):
        names = load_dataset_names(dataset)
        self.dataset, self.classes = dataset, list(names.classes)
        self._index = {normalise(c): i for i, c in enumerate(names.classes)}
        self._index.update({normalise(w): i for i, w in enumerate(names.class_ids)})
        for raw, target in ALIASES.get(dataset, {}).items():
            self._index[normalise(raw)] = self._index[normalise(target)]

    def get(self, name: str) -> int | None:
        return self._index.get(normalise(name))

    def map_all(self, names: list[str], where: str) -> list[int]:
        """Registry indices of `names` (in order); a one-line UserError if any is unknown or repeated."""
        out = [self.get(n) for n in names]
        unknown = [n for n, i in zip(names, out) if i is None]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            shown = ", ".join(f"'{n}'" for n in unknown[:3]) + more
            raise UserError(f"{where}: class(es) {shown} match no class of dataset {self.dataset} "
                            f"(data/names/{self.dataset}.txt); rename the folders or fix the copy")
        if len(set(out)) != len(out):
            twice = sorted({n for n, i in zip(names, out) if out.count(i) > 1})
            raise UserError(f"{where}: {', '.join(map(repr, twice[:4]))} name the same class of dataset "
                            f"{self.dataset}; keep one folder per class")
        return out


@lru_cache(maxsize=None)
def class_map(dataset: str) -> ClassMap:
    return ClassMap(dataset)
