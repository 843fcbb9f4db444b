"""Cached features and matches: computed once, reused, invalidated by pool or images, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

import uniil.backbones.features as features_mod
from conftest import run_cli
from match_fixtures import pool  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def synthetic_source(domain="photo"):
    from uniil.data.images import dataset_images

    return dataset_images("synthetic", "test", domain)


def test_second_call_reads_the_cache_and_equals_fresh_encoding(pool, isolated_cache):
    from uniil.attrpool.cache import cached_matches
    from uniil.attrpool.match import PoolAttributes
    from uniil.backbones.factory import load_backbone

    attrs = PoolAttributes.load(pool)
    src = synthetic_source()
    first = cached_matches(attrs, src, 5)
    second = cached_matches(attrs, src, 5)
    assert not first.from_cache and second.from_cache
    assert np.array_equal(first.features, second.features) and np.array_equal(first.ids, second.ids)
    fresh = load_backbone(attrs.backbone).encode_images([src.load(i) for i in range(7)])
    assert np.allclose(second.features[:7], fresh, atol=1e-6)
    assert np.array_equal(second.ids[:7], attrs.index.search(fresh, 5)[1])
    assert len(list(isolated_cache.rglob("features.npy"))) == 1


def test_cli_cache_flag_and_json(pool):
    args = ["attrs", "match", "--dataset", "synthetic", "--domain", "clipart", "--cache", "--pool", pool]
    r = run_cli(*args, "--top-k", "3")
    assert r.code == 0 and "features computed into, top-3 matches computed into the cache" in r.err
    r = run_cli(*args, "--top-k", "5")  # another k: new matches from the cached features
    assert r.code == 0 and "features read from, top-5 matches computed into the cache" in r.err
    r = run_cli(*args, "--json", "--top-k", "3")
    assert r.code == 0 and "features read from, top-3 matches read from the cache" in r.err
    found = json.loads(r.out)
    assert len(found) == 240 and found[10]["image"] == "synthetic/test/clipart/10"
    assert all(len(f["matches"]) == 3 for f in found)
    r = run_cli("attrs", "match", "--dataset", "synthetic", "--cache", "--limit", "3", "--pool", pool)
    assert r.code == 1 and "whole dataset split" in r.err


def test_changed_pool_recomputes_matches_but_reuses_features(pool, tmp_path, monkeypatch):
    from uniil.attrpool.cache import cached_matches
    from uniil.attrpool.match import PoolAttributes

    attrs = PoolAttributes.load(pool)
    src = synthetic_source()
    cached_matches(attrs, src, 5)
    attrs.fingerprint = "a rebuilt pool"  # what a rebuild with other attributes changes
    again = cached_matches(attrs, src, 5)
    assert not again.from_cache
    monkeypatch.setattr(features_mod, "_encode_chunk", lambda *a: pytest.fail("features were encoded again"))
    assert features_mod.image_features(src, attrs.backbone).from_cache


def test_interrupted_encoding_keeps_finished_chunks(pool, monkeypatch):
    from uniil.attrpool.match import PoolAttributes

    attrs = PoolAttributes.load(pool)
    src = synthetic_source("sketch")
    monkeypatch.setattr(features_mod, "CHUNK", 100)
    loads = []
    original = src.loader

    def flaky(i):
        loads.append(i)
        if len(loads) == 150:
            raise KeyboardInterrupt
        return original(i)

    src.loader = flaky
    with pytest.raises(KeyboardInterrupt):
        features_mod.image_features(src, attrs.backbone)
    loads.clear()
    src.loader = original
    src.loader = lambda i: (loads.append(i), original(i))[1]
    result = features_mod.image_features(src, attrs.backbone)
    assert not result.from_cache and min(loads) == 100  # chunk 0 came from disk
    assert result.features.shape[0] == 240 and result.valid.all()


def test_image_folder_cache_key_follows_the_files(tmp_path):
    from uniil.data.images import dataset_images
    from uniil.data.synthetic import SyntheticDataset

    root = SyntheticDataset("test", "photo", n_per_class=2, classes=["star", "heart"]).export_image_folder(tmp_path / "f")
    key = dataset_images(str(root), "test").cache_key
    assert key == dataset_images(str(root), "test").cache_key
    (root / "star" / "photo_00000.png").write_bytes(b"broken now")
    assert dataset_images(str(root), "test").cache_key != key


def test_unreadable_dataset_images_are_masked(pool, tmp_path):
    from uniil.attrpool.cache import cached_matches
    from uniil.attrpool.match import PoolAttributes
    from uniil.data.images import dataset_images
    from uniil.data.synthetic import SyntheticDataset

    root = SyntheticDataset("test", "photo", n_per_class=2, classes=["star", "heart"]).export_image_folder(tmp_path / "f")
    (root / "star" / "photo_00001.png").write_bytes(b"broken")
    src = dataset_images(str(root), "test")
    found = cached_matches(PoolAttributes.load(pool), src, 3)
    broken = src.keys.index(str(root / "star" / "photo_00001.png"))
    assert not found.valid[broken] and (found.ids[broken] == -1).all()
    assert found.valid.sum() == 3 and (found.ids[found.valid] >= 0).all()


def test_another_pool_with_the_same_call_history_gets_its_own_matches(pool, tmp_path):
    """Call ids restart in every pool file: two pools asked the same number of prompts (or one pool
    deleted and built again with other classes) must still not share cached matches."""
    from conftest import server_args
    from llm_server import FakeLLMServer
    from match_fixtures import CLASSES

    from uniil.attrpool.cache import cached_matches
    from uniil.attrpool.match import PoolAttributes

    other = tmp_path / "other.duckdb"
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(["square", "triangle", "arrow", "kite"][:len(CLASSES)]) + "\n")
    with FakeLLMServer(n_attributes=3) as server:
        r = run_cli("attrs", "build", "--pool", other, "--classes", classes, "--domains", "sketch,photo",
                    "--templates", "class-appearance,domain-style", *server_args(server))
    assert r.code == 0, r.err
    first, second = PoolAttributes.load(pool), PoolAttributes.load(other)
    assert first.texts != second.texts and first.fingerprint != second.fingerprint
    src = synthetic_source()
    cached_matches(first, src, 3)
    theirs = cached_matches(second, src, 3)
    assert not theirs.from_cache and theirs.features_from_cache  # same backbone: features are shared
    assert theirs.ids.max() < len(second.texts)
    assert np.array_equal(theirs.ids, second.index.search(theirs.features, 3)[1])


def test_a_checkpoint_rewritten_in_place_is_another_backbone(tmp_path):
    from uniil.backbones.features import backbone_key
    from uniil.backbones.spec import BackboneSpec

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights of step 1")
    spec = BackboneSpec.from_options("ViT-B-32", str(ckpt))
    before = backbone_key(spec)
    assert before.startswith(spec.id) and backbone_key(spec) == before
    ckpt.write_bytes(b"weights of step 2, fine-tuned")
    assert backbone_key(spec) != before
    assert backbone_key(BackboneSpec.from_options("uniil-tiny", None)) == "uniil-tiny@seed0"


def test_a_split_of_only_unreadable_images_is_an_error(pool, tmp_path):
    from uniil.data.synthetic import SyntheticDataset

    root = SyntheticDataset("test", "photo", n_per_class=1, classes=["star", "heart"]).export_image_folder(tmp_path / "f")
    for png in root.rglob("*.png"):
        png.write_bytes(b"broken")
    r = run_cli("attrs", "match", "--dataset", root, "--cache", "--pool", pool)
    assert r.code == 1 and "none of the 2 image(s)" in r.err and "Traceback" not in r.err
