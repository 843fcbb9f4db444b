"""`uniil attrs eval`: class names vs descriptions vs enriched prototypes, checked against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from match_fixtures import CLASSES, pool  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path / "cache"))


def test_evaluate_matches_a_hand_computation(pool):
    from uniil.attrpool.match import PoolAttributes
    from uniil.attrpool.zeroshot import class_attribute_means, class_text_embeddings, evaluate
    from uniil.backbones.factory import load_backbone

    attrs = PoolAttributes.load(pool)
    clip = load_backbone(attrs.backbone)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((40, attrs.embeddings.shape[1])).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = rng.integers(0, len(CLASSES), 40)
    result = evaluate(attrs, clip, feats, labels, CLASSES, beta=1.0)
    text = clip.encode_text([f"a photo of a {c}." for c in CLASSES])
    means = []
    for c in CLASSES:
        rows = [i for i, s in enumerate(attrs.sources) if attrs.kinds[i] == "class" and c in s]
        means.append(attrs.embeddings[rows].mean(0))
    means = np.stack(means)
    assert np.allclose(class_attribute_means(attrs, CLASSES), means)
    assert np.allclose(class_text_embeddings(clip, CLASSES), text, atol=1e-6)
    # Descriptions: the mean of per-attribute similarities, computed the long way.
    per_attr = np.array([[np.mean([f @ attrs.embeddings[i] for i, s in enumerate(attrs.sources)
                                   if attrs.kinds[i] == "class" and c in s]) for c in CLASSES] for f in feats])
    assert result.descriptions == pytest.approx((per_attr.argmax(1) == labels).mean() * 100)
    assert result.class_names == pytest.approx(((feats @ text.T).argmax(1) == labels).mean() * 100)
    enriched = text + means
    enriched /= np.linalg.norm(enriched, axis=1, keepdims=True)
    assert result.enriched == pytest.approx(((feats @ enriched.T).argmax(1) == labels).mean() * 100)
    assert evaluate(attrs, clip, feats, labels, CLASSES, beta=0.0).enriched == result.class_names
    assert result.images == 40


def test_cli_eval_json_and_missing_classes(pool, tmp_path):
    from uniil.data.synthetic import SyntheticDataset

    root = SyntheticDataset("test", "photo", n_per_class=3, classes=CLASSES).export_image_folder(tmp_path / "imgs")
    r = run_cli("attrs", "eval", "--pool", pool, "--dataset", root, "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert set(result) == {"class_names", "descriptions", "enriched", "images"} and result["images"] == 12
    assert all(0 <= result[k] <= 100 for k in ("class_names", "descriptions", "enriched"))
    r = run_cli("attrs", "eval", "--pool", pool, "--dataset", "synthetic")
    assert r.code == 1 and "have no attributes in the pool" in r.err  # the pool knows 4 of 24 classes
