"""The FAISS index over canonical attribute embeddings, stored as a BLOB inside the pool.

Exact inner product (= cosine, embeddings are L2-normalised) below IVF_FROM attributes; IVF from
there on, where exact search dominates matching time (1e4 images against 1e5 attributes at
d = 512: 16.8 s exact, 1.1 s IVF with recall@10 = 1.0; benchmarks/bench_match.py).
"""

from __future__ import annotations

import numpy as np

IVF_FROM = 100_000


def build_index(vectors: np.ndarray):
    import faiss

    n, d = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if n < IVF_FROM:
        index = faiss.IndexFlatIP(d)
        desc = f"Flat,IP (exact) d={d}"
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = 64  # k-means on a subsample: 15 s instead of minutes
        index.train(vectors)
        index.nprobe = 16
        desc = f"IVF{nlist},Flat,IP nprobe={index.nprobe} d={d}"
    index.add(vectors)
    return index, desc


def serialize_index(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize_index(blob: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
