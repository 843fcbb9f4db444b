"""Canonical spelling of attribute phrases, and the junk filter small models need.

Normalising (case, Unicode, hyphens, punctuation, articles, whitespace) makes exact duplicates
equal; semantic near-duplicates are merged later by embedding similarity (dedupe.py).
"""

from __future__ import annotations

import re
import unicodedata

NORMALIZER_VERSION = 1
MAX_WORDS = 8
MAX_CHARS = 80
_LEADING = re.compile(r"^(?:(?:a|an|the|it has|has|have|with|its|their)\s+)+")
_PUNCT = re.compile(r"[^\w\s']+")
_SPACES = re.compile(r"\s+")
# Field names and filler that small models echo back instead of attributes.
_JUNK = {"attribute", "attributes", "visual attributes", "feature", "features", "cue", "cues", "name",
         "string", "json", "none", "n/a", "etc", "and more", "other", "others", "description"}


def normalize_phrase(phrase: str) -> str:
    text = unicodedata.normalize("NFKC", phrase).lower()
    text = text.replace("_", " ").replace("-", " ").replace("\u2019", "'")
    text = _PUNCT.sub(" ", text)
    text = _SPACES.sub(" ", text).strip(" '")
    text = _LEADING.sub("", text)
    return re.sub(r"\s+etc$", "", text).strip()


def usable_phrase(normalized: str, source_name: str, *, authored: bool = False) -> bool:
    """False for phrases that say nothing about how the source looks. The length limits catch a
    model rambling; `authored` phrases, read from a file people wrote (CuPL's descriptors are whole
    sentences), are kept at any length."""
    too_long = len(normalized) > MAX_CHARS or len(normalized.split()) > MAX_WORDS
    if not normalized or (too_long and not authored):
        return False
    if not re.search(r"[^\W\d_]", normalized) or normalized in _JUNK:
        return False
    return normalized != normalize_phrase(source_name)
