"""uniil-micro's figures, computed from the renderer's ground truth: zero-shot accuracy by class
name and by description (the reference attributes, data/attributes/synthetic.json) per domain.
`uniil backbone build --force` prints them for the rebuilt and the shipped weights side by side;
tests/test_micro.py asserts the README's targets on them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..data.synthetic import DOMAINS, SyntheticDataset, class_names

CLASS_TEMPLATE = "a photo of a {}."


def reference_attributes() -> dict[str, list[str]]:
    """The reference annotator's attributes of each shape class (shipped package data)."""
    text = resources.files("uniil.data").joinpath("attributes/synthetic.json").read_text(encoding="utf-8")
    return json.loads(text)["classes"]


@dataclass
class Figures:
    class_names: dict[str, float]  # domain -> accuracy (%)
    descriptions: dict[str, float]

    def rows(self) -> list[tuple[str, str, float]]:
        return [(kind, d, acc) for kind, accs in (("class names", self.class_names),
                                                  ("descriptions", self.descriptions)) for d, acc in accs.items()]


def test_features(backbone, per_class: int = 20, domains=DOMAINS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per domain: normalised image features [N, D] and labels [N] of the synthetic test split."""
    out = {}
    for domain in domains:
        ds = SyntheticDataset("test", domain, n_per_class=per_class)
        feats = backbone.encode_images([ds.image(i) for i in range(len(ds))])
        out[domain] = (feats, np.asarray([ds.labels[i // per_class] for i in range(len(ds))]))
    return out


def description_prototypes(backbone, attributes: dict[str, list[str]]) -> np.ndarray:
    """Classification by description: a class scores the mean similarity to its attributes, which is
    the similarity to the mean of their embeddings."""
    names = class_names()
    flat = [p for c in names for p in attributes[c]]
    emb = backbone.encode_text(flat)
    ends = np.cumsum([len(attributes[c]) for c in names])
    return np.stack([emb[e - len(attributes[c]):e].mean(0) for e, c in zip(ends, names)])


def figures(backbone, per_class: int = 20, features=None) -> Figures:
    features = features or test_features(backbone, per_class)
    by_name = backbone.encode_text([CLASS_TEMPLATE.format(c) for c in class_names()])
    by_description = description_prototypes(backbone, reference_attributes())

    def acc(protos, domain):
        feats, labels = features[domain]
        return float((np.argmax(feats @ protos.T, axis=1) == labels).mean() * 100)

    return Figures({d: acc(by_name, d) for d in features}, {d: acc(by_description, d) for d in features})
