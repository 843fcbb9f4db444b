"""Frozen CLIP image features and their attribute matches, cached on disk per image.

Features are keyed by backbone (a checkpoint file's size and time included) and by the dataset
split's identity (its generator settings, or its files); matches add a fingerprint of the pool's
attributes and k, so a changed pool or backbone never serves stale entries. Sets are written in
chunks with atomic renames: an interrupted run keeps its finished chunks, processes never see half
a file, and several processes (DDP ranks) can share one cache. Loaded sets live in memory, so a
training batch's lookup is a numpy gather.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

CACHE_ENV = "UNIIL_CACHE_DIR"
CHUNK = 1024


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("uniil"))


def _slug(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    tmp.replace(path)


def backbone_key(backbone) -> str:
    """The backbone's id, plus the size and time of its checkpoint file when it is one: a
    checkpoint rewritten in place (a fine-tuned one saved over the old) is another backbone."""
    key = backbone.id
    weights = Path(backbone.pretrained) if backbone.pretrained and os.path.sep in backbone.pretrained else None
    if weights is not None and weights.is_file():
        st = weights.stat()
        key += f"|{st.st_size}|{st.st_mtime_ns}"
    return key


@dataclass
class FeatureSet:
    features: np.ndarray  # [N, D] L2-normalised; zero rows where the image could not be read
    valid: np.ndarray  # [N] bool
    from_cache: bool


def image_features(source, backbone, *, device: str = "cpu", batch_size: int = 64, progress=None) -> FeatureSet:
    """Features of every image of a cacheable source (a dataset split), computed at most once."""
    if source.cache_key is None:
        raise UserError("only dataset splits can be cached (--dataset NAME); files named one by one are not")
    folder = cache_dir() / "features" / _slug(backbone_key(backbone)) / _slug(source.cache_key)
    done, mask = folder / "features.npy", folder / "valid.npy"
    if done.exists() and mask.exists():
        return FeatureSet(np.load(done), np.load(mask), True)
    from ..backbones.factory import load_backbone

    clip = None
    n = len(source)
    chunks = range(0, n, CHUNK)
    if progress:
        progress.start("features", "encoding images", n)
    parts, valids = [], []
    for start in chunks:
        part, vpart = folder / f"part-{start // CHUNK:05d}.npy", folder / f"valid-{start // CHUNK:05d}.npy"
        if part.exists() and vpart.exists():  # finished by an earlier, interrupted run
            parts.append(np.load(part))
            valids.append(np.load(vpart))
        else:
            clip = clip or load_backbone(backbone, device=device)
            feats, valid = _encode_chunk(source, range(start, min(start + CHUNK, n)), clip, batch_size)
            _save_atomic(part, feats)
            _save_atomic(vpart, valid)
            parts.append(feats)
            valids.append(valid)
        if progress:
            progress.advance("features", len(parts[-1]))
    if progress:
        progress.stop("features")
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    valid = np.concatenate(valids) if valids else np.zeros(0, bool)
    _save_atomic(done, features)
    _save_atomic(mask, valid)
    for p in list(folder.glob("part-*.npy")) + list(folder.glob("valid-*.npy")):
        p.unlink(missing_ok=True)
    return FeatureSet(features, valid, False)


def _encode_chunk(source, indices, clip, batch_size):
    feats = np.zeros((len(indices), clip.dim), np.float32)
    valid = np.zeros(len(indices), bool)
    for b in range(0, len(indices), batch_size):
        images, rows = [], []
        for j, i in enumerate(indices[b:b + batch_size], start=b):
            try:
                images.append(source.load(i))
                rows.append(j)
            except Exception as exc:  # PIL raises many kinds for broken files
                log.warning("skipped %s: %s", source.keys[i], str(exc).splitlines()[0][:120] if str(exc) else exc)
        if images:
            feats[rows] = clip.encode_images(images, batch_size)
            valid[rows] = True
    return feats, valid


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
    path = (cache_dir() / "matches" / _slug(pool_attrs.fingerprint) / _slug(backbone_key(pool_attrs.backbone))
            / f"{_slug(source.cache_key)}-k{k}.npz")
    if path.exists():
        with np.load(path) as z:
            return MatchSet(feats.features, feats.valid, z["ids"], z["scores"], True, feats.from_cache)
    ids = np.full((len(feats.features), k), -1, np.int64)
    scores = np.zeros((len(feats.features), k), np.float32)
    rows = np.flatnonzero(feats.valid)
    if len(rows):
        s, i = pool_attrs.index.search(np.ascontiguousarray(feats.features[rows]), min(k, len(pool_attrs.texts)))
        ids[rows, :i.shape[1]], scores[rows, :s.shape[1]] = i, s
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=ids, scores=scores)
    tmp.replace(path)
    return MatchSet(feats.features, feats.valid, ids, scores, False, feats.from_cache)
