"""Frozen image features of a backbone over a dataset split, computed at most once and cached on disk.

Their users are the trainer (methods that work on frozen features, DDAS, the attribute matcher)
and attribute matching (`uniil attrs match --cache`, the cached matches of attrpool/cache.py), so
they live here, below both. Features are keyed by backbone (a checkpoint file's size and time
included) and by the split's identity (its generator settings, or its files), so a changed
backbone or split never serves stale entries. Sets are written in chunks with atomic renames: an
interrupted run keeps its finished chunks, processes never see half a file, and several processes
(DDP ranks) can share one cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import atomic_path, cache_dir
from ..errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1024


def slug(text: str) -> str:
    """A short, file-name-safe digest of a cache key."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


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
    folder = cache_dir() / "features" / slug(backbone_key(backbone)) / slug(source.cache_key)
    done, mask = folder / "features.npy", folder / "valid.npy"
    if done.exists() and mask.exists():
        return FeatureSet(np.load(done), np.load(mask), True)
    from .factory import load_backbone

    clip = None
    n = len(source)
    if progress:
        progress.start("features", "encoding images", n)
    parts, valids = [], []
    for start in range(0, n, CHUNK):
        part, vpart = folder / f"part-{start // CHUNK:05d}.npy", folder / f"valid-{start // CHUNK:05d}.npy"
        if part.exists() and vpart.exists():  # finished by an earlier, interrupted run
            parts.append(np.load(part))
            valids.append(np.load(vpart))
        else:
            clip = clip or load_backbone(backbone, device=device)
            feats, valid = _encode_chunk(source, range(start, min(start + CHUNK, n)), clip, batch_size)
            save_array(part, feats)
            save_array(vpart, valid)
            parts.append(feats)
            valids.append(valid)
        if progress:
            progress.advance("features", len(parts[-1]))
    if progress:
        progress.stop("features")
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    valid = np.concatenate(valids) if valids else np.zeros(0, bool)
    save_array(done, features)
    save_array(mask, valid)
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
