"""The FAISS index over canonical attribute embeddings, stored as a BLOB inside the pool.

Exact inner product (= cosine, embeddings are L2-normalised) by default; IVF above IVF_ABOVE
attributes, where exact search over every image would dominate matching time.
"""

from __future__ import annotations

import numpy as np

IVF_ABOVE = 100_000


def build_index(vectors: np.ndarray):
    import faiss

    n, d = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if n <= IVF_ABOVE:
        index = faiss.IndexFlatIP(d)
        desc = f"Flat,IP (exact) d={d}"
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(8, nlist // 32)
        desc = f"IVF{nlist},Flat,IP nprobe={index.nprobe} d={d}"
    index.add(vectors)
    return index, desc


def serialize_index(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize_index(blob: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
