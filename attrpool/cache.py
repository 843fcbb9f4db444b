"""Attribute matches of a dataset split against a pool, cached on disk.

Matches are keyed by a fingerprint of the pool's attributes, the backbone and k on top of the
frozen image features they are computed from (backbones/features.py), so a changed pool or
backbone never serves stale entries. Loaded sets live in memory, so a training batch's lookup is
a numpy gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backbones.features import backbone_key, image_features, slug
from ..common import atomic_path, cache_dir
from ..errors import UserError



@dataclass
class MatchSet:
    features: np.ndarray  # [N, D]
    valid: np.ndarray  # [N]
    ids: np.ndarray  # [N, k] attribute ids, best first (-1 for unreadable images)
    scores: np.ndarray  # [N, k]
    from_cache: bool  # the matches
    features_from_cache: bool = False


def cached_matches(pool_attrs, source, k: int, *, device: str = "cpu", batch_size: int = 64,
                   progress=None) -> MatchSet:
    """Features and top-k matches of a dataset split against a pool, each computed at most once."""
    feats = image_features(source, pool_attrs.backbone, device=device, batch_size=batch_size, progress=progress)
    if len(feats.valid) and not feats.valid.any():
        raise UserError(f"none of the {len(feats.valid)} image(s) of {source.dataset}/{source.split} could be read")
    path = (cache_dir() / "matches" / slug(pool_attrs.fingerprint) / slug(backbone_key(pool_attrs.backbone))
            / f"{slug(source.cache_key)}-k{k}.npz")
    if path.exists():
        with np.load(path) as z:
            return MatchSet(feats.features, feats.valid, z["ids"], z["scores"], True, feats.from_cache)
    ids = np.full((len(feats.features), k), -1, np.int64)
    scores = np.zeros((len(feats.features), k), np.float32)
    rows = np.flatnonzero(feats.valid)
    if len(rows):
        s, i = pool_attrs.index.search(np.ascontiguousarray(feats.features[rows]), min(k, len(pool_attrs.texts)))
        ids[rows, :i.shape[1]], scores[rows, :s.shape[1]] = i, s
    with atomic_path(path) as tmp:
        np.savez(tmp, ids=ids, scores=scores)
    return MatchSet(feats.features, feats.valid, ids, scores, False, feats.from_cache)
