"""`uniil attrs match`: images encoded with the pool's backbone, top-k attributes through FAISS."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli

from match_fixtures import images, pool  # noqa: F401  (fixtures)


def test_json_lists_top_k_matches_per_image_sorted(pool, images):
    r = run_cli("attrs", "match", images, "--pool", pool, "--top-k", "4", "--json")
    assert r.code == 0, r.err
    found = json.loads(r.out)
    assert [f["image"] for f in found] == [str(images / f"img{i}.png") for i in range(4)]
    for f in found:
        scores = [m["score"] for m in f["matches"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert all(m["kind"] in ("class", "domain") and m["sources"] and m["attribute"] for m in f["matches"])


def test_faiss_and_exact_scoring_agree(pool, images):
    from uniil.attrpool.match import PoolAttributes
    from uniil.backbones.factory import load_backbone
    from uniil.data.images import image_files

    attrs = PoolAttributes.load(pool)
    src = image_files([images])
    feats = load_backbone(attrs.backbone).encode_images([src.load(i) for i in range(len(src))])
    via_index = attrs.top_k(feats, 5)
    exact = attrs.top_k(feats, 5, np.arange(len(attrs.texts)))
    for a, b in zip(via_index, exact):
        assert [round(m.score, 5) for m in a] == [round(m.score, 5) for m in b]
    brute = feats @ attrs.embeddings.T
    assert np.allclose([m.score for m in via_index[0]], np.sort(brute[0])[::-1][:5], atol=1e-5)


def test_kind_and_class_filters(pool, images):
    dom = json.loads(run_cli("attrs", "match", images, "--pool", pool, "--kind", "domain", "--json").out)
    assert {m["kind"] for f in dom for m in f["matches"]} == {"domain"}
    star = json.loads(run_cli("attrs", "match", images, "--pool", pool, "--kind", "class", "--classes", "star",
                              "--top-k", "50", "--json").out)
    assert all("star" in m["sources"] for f in star for m in f["matches"])
    r = run_cli("attrs", "match", images, "--pool", pool, "--classes", "dragon")
    assert r.code == 1 and "dragon" in r.err


def test_dataset_images_and_terminal_table(pool):
    r = run_cli("attrs", "match", "--dataset", "synthetic", "--domain", "sketch", "--limit", "3", "--pool", pool,
                "--top-k", "2")
    assert r.code == 0, r.err
    for key in ("synthetic/test/sketch/0", "synthetic/test/sketch/10", "synthetic/test/sketch/20"):
        assert key in r.out
    assert "rank" in r.out and "attribute" in r.out and "sources" in r.out


def test_unreadable_images_are_reported_and_skipped(pool, images, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(images, mixed)
    (mixed / "broken.png").write_bytes(b"not a png")
    (mixed / "empty.jpg").write_bytes(b"")
    r = run_cli("attrs", "match", mixed, "--pool", pool, "--json")
    assert r.code == 0, r.err
    assert len(json.loads(r.out)) == 4
    assert "skipped" in r.err and "broken.png" in r.err and "empty.jpg" in r.err
    assert "2 of 6 image(s) could not be read" in r.err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "broken.png").write_bytes(b"junk")
    r = run_cli("attrs", "match", only_bad, "--pool", pool)
    assert r.code == 1 and "none of the 1 image(s) could be read" in r.err


def test_bad_pools_and_backbones(pool, images, tmp_path):
    r = run_cli("attrs", "match", images, "--pool", pool, "--clip-model", "ViT-B-32", "--clip-pretrained", "none")
    assert r.code == 1 and "built with backbone uniil-tiny@seed0" in r.err
    r = run_cli("attrs", "match", images, "--pool", pool, "--clip-pretrained", "/no/such/checkpoint.pt")
    assert r.code == 1 and "built with backbone uniil-tiny@seed0" in r.err  # not silently ignored
    r = run_cli("attrs", "match", "--pool", pool, "--dataset", "synthetic", "--cache", "--kind", "class")
    assert r.code == 1 and "drop --kind, --classes and --html" in r.err
    r = run_cli("attrs", "match", images, "--pool", tmp_path / "missing.duckdb")
    assert r.code == 1 and "not found" in r.err
    r = run_cli("attrs", "match", "--pool", pool)
    assert r.code == 1 and "--dataset" in r.err
    from uniil.attrpool.store import PoolStore

    PoolStore.open_for_write(tmp_path / "empty.duckdb").finish(tmp_path / "empty.duckdb")
    r = run_cli("attrs", "match", images, "--pool", tmp_path / "empty.duckdb")
    assert r.code == 1 and "has no attributes yet" in r.err


def test_html_report_has_every_image_and_attribute(pool, images, tmp_path):
    page = tmp_path / "report.html"
    r = run_cli("attrs", "match", images, "--pool", pool, "--top-k", "3", "--json", "--html", page)
    assert r.code == 0, r.err
    found = json.loads(r.out)
    text = page.read_text()
    assert text.count("<img ") == 4 and text.count("data:image/png;base64,") == 4
    assert "http://" not in text and "https://" not in text  # self-contained
    for f in found:
        for m in f["matches"]:
            assert m["attribute"] in text
