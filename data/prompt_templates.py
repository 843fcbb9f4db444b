"""Per-dataset prompt templates: CLIP's (Radford et al. 2021, the prompt sets of its evaluation
suite) as the MTIL code of MoE-Adapters and ZSCL uses them. The first template of a dataset is
the one those codes train with; evaluation averages the text embeddings of all of them.

A dataset without an entry uses the run's own templates."""

from __future__ import annotations

_PHOTO = ["a photo of a {}.", "a photo of the {}."]
_CIFAR = [f"a {adj}photo of {art} {{}}." .replace("  ", " ")
          for art in ("a", "the")
          for adj in ("", "blurry ", "black and white ", "low contrast ", "high contrast ", "bad ", "good ")] + \
         ["a photo of a small {}.", "a photo of a big {}.", "a photo of the small {}.", "a photo of the big {}."]
_CALTECH_FORMS = ["a photo of {} {{}}.", "a painting of {} {{}}.", "{} plastic {{}}.", "a sculpture of {} {{}}.",
                  "a sketch of {} {{}}.", "a tattoo of {} {{}}.", "{} toy {{}}.", "a rendition of {} {{}}.",
                  "{} embroidered {{}}.", "{} cartoon {{}}.", "{} {{}} in a video game.", "{} plushie {{}}.",
                  "{} origami {{}}.", "art of {} {{}}.", "graffiti of {} {{}}.", "a drawing of {} {{}}.",
                  "a doodle of {} {{}}."]

DATASET_TEMPLATES: dict[str, list[str]] = {
    "aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
    "caltech101": [f.format(art) for art in ("a", "the") for f in _CALTECH_FORMS],
    "cifar100": _CIFAR,
    "dtd": [f"a photo of {art} {{}} {kind}." for art in ("a", "the") for kind in ("texture", "pattern", "thing",
                                                                                  "object")],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "flowers102": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of a {}, a type of food."],
    "mnist": ['a photo of the number: "{}".'],
    "oxford_pet": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}, a type of car.", "a photo of a {}.", "a photo of the {}.", "a photo of my {}.",
                      "i love my {}!", "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                      "a photo of my old {}."],
    "sun397": _PHOTO,
}


def class_prompts(class_datasets: list[str], fallback: list[str]) -> list[list[str]]:
    """The templates of each class: its dataset's own, or `fallback`."""
    return [DATASET_TEMPLATES.get(d, fallback) for d in class_datasets]
