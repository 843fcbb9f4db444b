"""Answer parsing (every shape servers and small models return) and phrase normalisation."""

import pytest

from uniil.attrpool.normalize import normalize_phrase, usable_phrase
from uniil.attrpool.parse import parse_attributes


@pytest.mark.parametrize("text, expected", [
    ('{"attributes": ["red petals", "green stem"]}', ["red petals", "green stem"]),
    ('["red petals", "green stem"]', ["red petals", "green stem"]),
    ('Sure:\n```json\n{"attributes": ["a", "b"]}\n```\nDone.', ["a", "b"]),
    ('Here it is: {"features": ["x y", "z"]} hope that helps', ["x y", "z"]),
    ('{"attributes": [{"attribute": "long tail"}, {"name": "big ears"}]}', ["long tail", "big ears"]),
    ("1. red petals\n2. green stem\n3) thorny branches", ["red petals", "green stem", "thorny branches"]),
    ("- red petals\n* green stem\n\u2022 thorns", ["red petals", "green stem", "thorns"]),
    (" golden color, long legs, long tail, long fluffy coat", ["golden color", "long legs", "long tail", "long fluffy coat"]),
    (" black and white stripes; horse-like body; short mane", ["black and white stripes", "horse-like body", "short mane"]),
    ('{"attributes": ["red petals", "gre', ["red petals"]),  # cut off by max_tokens: complete items kept
    ('{"attributes": ["say \\"hi\\"", "b"', ['say "hi"', 'b']),
    ("", []),
    ('{"attributes": []}', []),
])
def test_parse_attributes(text, expected):
    assert parse_attributes(text) == expected


@pytest.mark.parametrize("raw, norm", [
    ("  The Black-and-White  Stripes. ", "black and white stripes"),
    ("A long, curved beak!", "long curved beak"),
    ("It has a red glow", "red glow"),
    ("an Owl's face", "owl's face"),
    ("fluffy fur, etc", "fluffy fur"),
    ("\uff32\uff45\uff44 petals", "red petals"),  # full-width letters (NFKC)
])
def test_normalize_phrase(raw, norm):
    assert normalize_phrase(raw) == norm


def test_usable_phrase_drops_junk_and_echoes():
    assert usable_phrase("red petals", "rose")
    assert not usable_phrase("rose", "Rose")  # the class name echoed back
    assert not usable_phrase("attributes", "rose")  # a field name
    assert not usable_phrase("", "rose") and not usable_phrase("123", "rose")
    assert not usable_phrase(" ".join(["word"] * 12), "rose")  # a sentence, not a phrase
