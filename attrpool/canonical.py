"""From answers to the pool's canonical attributes: parse, normalise, drop exact duplicates, merge
near-duplicates (MiniLM), embed with the CLIP text tower, index with FAISS; keep provenance.

Derivation is a pure function of the answered calls and the settings, fingerprinted in the pool:
when neither changed, nothing is recomputed and no model is loaded.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..backbones.spec import BackboneSpec
from ..common import NullProgress, Progress
from ..errors import UserError
from ..prompts.templates import prompt_hash
from .dedupe import EMBEDDER_ID, merge_near_duplicates
from .index import build_index, serialize_index
from .normalize import normalize_phrase, usable_phrase
from .parse import parse_attributes
from .plan import derivation_settings
from .store import PoolStore

log = logging.getLogger(__name__)

# The template of a call that holds a descriptor file's phrases rather than an LLM's answer
# (importer.py): "import:<file name>".
IMPORT_TEMPLATE_PREFIX = "import:"


@dataclass
class DeriveResult:
    rebuilt: bool
    attributes: int
    raw_attributes: int


def derive_fingerprint(call_ids: list[int], threshold: float, backbone_id: str) -> str:
    return prompt_hash({"calls": call_ids, **derivation_settings(threshold, backbone_id)})


def _phrase_vectors(store: PoolStore, kind: str, texts: list[str], progress: Progress, embedder_factory) -> np.ndarray:
    cached = store.cached_phrase_vectors(EMBEDDER_ID, texts)
    missing = [t for t in texts if t not in cached]
    progress.start("dedupe", f"embedding {kind} phrases (MiniLM)", len(texts))
    progress.advance("dedupe", len(texts) - len(missing))
    if missing:
        embedder = embedder_factory()
        for i in range(0, len(missing), 4096):
            chunk = missing[i:i + 4096]
            vecs = embedder.encode(chunk)
            store.store_phrase_vectors(EMBEDDER_ID, chunk, vecs)
            cached.update(zip(chunk, vecs))
            progress.advance("dedupe", len(chunk))
    progress.stop("dedupe")
    return np.asarray([cached[t] for t in texts], dtype=np.float32).reshape(len(texts), -1)


def derive_attributes(store: PoolStore, backbone: BackboneSpec, threshold: float, *, device: str = "cpu",
                      progress: Progress | None = None, embedder_factory=None, force: bool = False) -> DeriveResult:
    progress = progress or NullProgress()
    calls = store.answered_calls()
    fingerprint = derive_fingerprint([c[0] for c in calls], threshold, backbone.id)
    if not force and store.has_attributes() and store.meta("derived_fingerprint") == fingerprint:
        s = store.stats()
        return DeriveResult(False, s["attributes"], s["raw_attributes"])

    # occurrences: (kind, normalized, raw, source_kind, source_name, template, call_id)
    occurrences = []
    for call_id, source_kind, source_name, template, response in calls:
        authored = template.startswith(IMPORT_TEMPLATE_PREFIX)
        for raw in parse_attributes(response):
            norm = normalize_phrase(raw)
            if usable_phrase(norm, source_name, authored=authored):
                occurrences.append((source_kind, norm, raw.strip(), source_kind, source_name, template, call_id))
    if not occurrences:
        raise UserError("no usable attribute in any answer; try a larger model (--llm-url/--llm openai:MODEL)")

    if embedder_factory is None:
        from .dedupe import shared_embedder as embedder_factory

    canonical: list[tuple[str, str]] = []  # (kind, text), index = attribute id
    canonical_of: dict[tuple[str, str], int] = {}  # (kind, normalized) -> attribute id
    for kind in ("class", "domain"):
        counts = Counter(o[1] for o in occurrences if o[0] == kind)
        if not counts:
            continue
        texts = sorted(counts, key=lambda t: (-counts[t], len(t), t))  # priority order
        vectors = _phrase_vectors(store, kind, texts, progress, embedder_factory)
        leader = merge_near_duplicates(vectors, np.arange(len(texts)), threshold, texts)
        for i, t in enumerate(texts):
            lead = texts[leader[i]]
            if (kind, lead) not in canonical_of:
                canonical_of[(kind, lead)] = len(canonical)
                canonical.append((kind, lead))
            canonical_of[(kind, t)] = canonical_of[(kind, lead)]

    provenance = sorted({(canonical_of[(o[0], o[1])], o[3], o[4], o[5], o[2], o[6]) for o in occurrences},
                        key=lambda r: (r[0], r[5], r[4]))

    from ..backbones.factory import load_backbone
    progress.start("embed", f"embedding attributes ({backbone.model})", len(canonical))
    clip = load_backbone(backbone, device=device)
    embeddings = clip.encode_text([t for _, t in canonical])
    progress.advance("embed", len(canonical))
    progress.stop("embed")
    index, desc = build_index(embeddings)
    store.replace_attributes(
        clip.dim, [(i, k, t) for i, (k, t) in enumerate(canonical)], embeddings, provenance,
        serialize_index(index), desc,
        {"dim": str(clip.dim), "derived_fingerprint": fingerprint, "dedupe_threshold": str(threshold),
         "embedder": EMBEDDER_ID, "backbone_model": backbone.model, "backbone_pretrained": backbone.pretrained or ""})
    return DeriveResult(True, len(canonical), len(provenance))
