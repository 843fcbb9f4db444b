"""Which attributes an image calls up: images encoded with the pool's own CLIP backbone, the
top-k attributes found through the pool's FAISS index (or, when the candidates are filtered by
kind or class, by exact scoring of just those)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from ..backbones.spec import BackboneSpec
from ..errors import UserError
from .index import deserialize_index
from .store import PoolStore

log = logging.getLogger(__name__)


@dataclass
class Match:
    attribute: str
    score: float
    kind: str
    sources: list[str]


@dataclass
class PoolAttributes:
    """A pool's canonical attributes, loaded once: texts, kinds, embeddings, sources, index."""

    backbone: BackboneSpec
    texts: list[str]
    kinds: np.ndarray
    embeddings: np.ndarray
    sources: list[list[str]]
    index: object
    source_kinds: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""  # identifies the attribute set: texts, kinds, embeddings (see content_fingerprint)

    @classmethod
    def load(cls, pool) -> "PoolAttributes":
        with PoolStore.open_for_read(pool) as store:
            if not store.attribute_count():
                raise UserError(f"pool {pool} has no attributes yet; finish it with `uniil attrs build`")
            rows = store.attribute_rows()
            prov = store.attribute_sources()
            blob = store.index_blob()
            backbone = BackboneSpec(store.meta("backbone_model"), store.meta("backbone_pretrained") or None)
        sources: list[list[str]] = [[] for _ in rows]
        source_kinds: dict[str, str] = {}
        for attr_id, kind, name in prov:
            sources[attr_id].append(name)
            source_kinds[name] = kind
        texts, kinds = [r[2] for r in rows], np.array([r[1] for r in rows])
        embeddings = np.asarray([r[3] for r in rows], dtype=np.float32)
        return cls(backbone, texts, kinds, embeddings, sources, deserialize_index(blob), source_kinds,
                   content_fingerprint(texts, kinds, embeddings))

    def require_backbone(self, backbone: BackboneSpec | None, pool) -> None:
        """A --clip-model the user gave must be the pool's own (None: use the pool's)."""
        if backbone is not None and backbone.id != self.backbone.id:
            raise UserError(f"pool {pool} was built with backbone {self.backbone.id}, not {backbone.id}; "
                            f"drop --clip-model or pass {self.backbone.cli_options()}")

    def candidates(self, kind: str = "all", classes: list[str] | None = None) -> np.ndarray | None:
        """Attribute ids allowed by the filters, or None for all of them."""
        if kind not in ("all", "class", "domain"):
            raise UserError(f"unknown --kind '{kind}'; use class, domain or all")
        if kind == "all" and not classes:
            return None
        mask = np.ones(len(self.texts), dtype=bool) if kind == "all" else self.kinds == kind
        if classes:
            unknown = [c for c in classes if self.source_kinds.get(c) != "class"]
            if unknown:
                raise UserError(f"class(es) {', '.join(unknown)} not in this pool; `uniil attrs list` shows them")
            wanted = set(classes)
            of_class = np.array([bool(wanted & set(s)) for s in self.sources])
            mask &= of_class | (self.kinds == "domain")
        return np.flatnonzero(mask)

    def top_k(self, features: np.ndarray, k: int, candidates: np.ndarray | None = None) -> list[list[Match]]:
        if k < 1:
            raise UserError("--top-k must be at least 1")
        if candidates is None:
            scores, ids = self.index.search(np.ascontiguousarray(features, dtype=np.float32), min(k, len(self.texts)))
        else:
            sub = features @ self.embeddings[candidates].T
            k = min(k, len(candidates))
            part = np.argpartition(-sub, k - 1, axis=1)[:, :k] if k < len(candidates) else \
                np.tile(np.arange(len(candidates)), (len(sub), 1))
            order = np.take_along_axis(sub, part, axis=1).argsort(axis=1)[:, ::-1]
            local = np.take_along_axis(part, order, axis=1)
            ids, scores = candidates[local], np.take_along_axis(sub, local, axis=1)
        return [[Match(self.texts[i], float(s), str(self.kinds[i]), self.sources[i])
                 for i, s in zip(row_ids, row_scores) if i >= 0] for row_ids, row_scores in zip(ids, scores)]


def content_fingerprint(texts: list[str], kinds: np.ndarray, embeddings: np.ndarray) -> str:
    """What cached matches depend on: attribute ids, texts, kinds and vectors. Two pools (or a pool
    deleted and built again) share it only when they would give the same matches; the pool's own
    derivation fingerprint is not enough, as it names LLM calls by ids that restart in a new file."""
    h = hashlib.sha256()
    h.update(json.dumps([texts, [str(k) for k in kinds]], ensure_ascii=False).encode())
    h.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    return h.hexdigest()


@dataclass
class MatchReport:
    results: list[tuple[str, list[Match]]]
    failures: list[tuple[str, str]]  # (key, reason) of images that could not be read


def match_images(pool, source, *, top_k: int = 5, kind: str = "all", classes: list[str] | None = None,
                 backbone: BackboneSpec | None = None, device: str = "cpu", batch_size: int = 64,
                 progress=None) -> MatchReport:
    from ..backbones.factory import load_backbone

    attrs = PoolAttributes.load(pool)
    attrs.require_backbone(backbone, pool)
    candidates = attrs.candidates(kind, classes)
    clip = load_backbone(attrs.backbone, device=device)
    results, failures = [], []
    if progress:
        progress.start("match", "matching images", len(source))
    for start in range(0, len(source), batch_size):
        images, keys = [], []
        for i in range(start, min(start + batch_size, len(source))):
            try:
                images.append(source.load(i))
                keys.append(source.keys[i])
            except Exception as exc:  # PIL raises many kinds for broken files
                failures.append((source.keys[i], str(exc).splitlines()[0][:120] or type(exc).__name__))
        if images:
            found = attrs.top_k(clip.encode_images(images, batch_size), top_k, candidates)
            results.extend(zip(keys, found))
        if progress:
            progress.advance("match", min(batch_size, len(source) - start))
    if progress:
        progress.stop("match")
    return MatchReport(results, failures)
