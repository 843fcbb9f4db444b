"""Zero-shot classification three ways, side by side: class-name prompts (Continual-CLIP),
classification by description (class score = mean similarity to the class's attributes), and
description-enriched prototypes t'_c = normalise(t_c + beta * mean attribute embedding)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

CLASS_TEMPLATES = ("a photo of a {}.",)


def class_text_embeddings(clip, classes: list[str], templates=CLASS_TEMPLATES) -> np.ndarray:
    """t_c: the normalised mean over templates of the text embedding of each class prompt."""
    per_template = np.stack([clip.encode_text([t.format(c) for c in classes]) for t in templates])
    mean = per_template.mean(axis=0)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def prompt_embeddings(clip, prompts: list[list[str]]) -> np.ndarray:
    """t_c from each class's own prompts (lists may differ in length): the normalised mean of their
    normalised text embeddings."""
    flat = [p for own in prompts for p in own]
    embedded = clip.encode_text(flat)
    ends = np.cumsum([len(own) for own in prompts])
    mean = np.stack([embedded[e - len(own):e].mean(axis=0) for e, own in zip(ends, prompts)])
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def class_attribute_means(attrs, classes: list[str]) -> np.ndarray:
    """[C, D] mean embedding of each class's attributes; every class must have some."""
    means, missing = [], []
    is_class = attrs.kinds == "class"
    for c in classes:
        rows = [i for i, s in enumerate(attrs.sources) if is_class[i] and c in s]
        if not rows:
            missing.append(c)
            continue
        means.append(attrs.embeddings[rows].mean(axis=0))
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise UserError(f"{len(missing)} class(es) of the dataset have no attributes in the pool ({shown}); "
                        "build the pool for this dataset first")
    return np.stack(means)


def enriched_prototypes(text: np.ndarray, attr_means: np.ndarray, beta: float) -> np.ndarray:
    proto = text + beta * attr_means
    return proto / np.linalg.norm(proto, axis=1, keepdims=True)


@dataclass
class ZeroShotResult:
    class_names: float
    descriptions: float
    enriched: float
    images: int

    def as_dict(self) -> dict:
        return {"class_names": round(self.class_names, 2), "descriptions": round(self.descriptions, 2),
                "enriched": round(self.enriched, 2), "images": self.images}


def evaluate(attrs, clip, features: np.ndarray, labels: np.ndarray, classes: list[str], beta: float = 1.0) -> ZeroShotResult:
    """Accuracies in percent over `features` (normalised image features) with integer `labels`."""
    if len(features) == 0:
        raise UserError("no readable images to evaluate")
    text = class_text_embeddings(clip, classes)
    attr_means = class_attribute_means(attrs, classes)

    def accuracy(prototypes: np.ndarray) -> float:
        return float((np.argmax(features @ prototypes.T, axis=1) == labels).mean() * 100)

    # The mean similarity to a class's attributes equals the similarity to their mean embedding.
    return ZeroShotResult(accuracy(text), accuracy(attr_means), accuracy(enriched_prototypes(text, attr_means, beta)),
                          len(features))
