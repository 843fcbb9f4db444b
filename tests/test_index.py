"""The pool's FAISS index: exact below IVF_FROM, IVF from there, both surviving serialisation."""

import numpy as np

from uniil.attrpool.index import IVF_FROM, build_index, deserialize_index, serialize_index


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_and_ivf_indexes_round_trip():
    rng = np.random.default_rng(0)
    small = unit(rng, 1000, 16)
    index, desc = build_index(small)
    assert desc.startswith("Flat")
    again = deserialize_index(serialize_index(index))
    assert np.array_equal(again.search(small[:5], 3)[1], index.search(small[:5], 3)[1])

    centres = unit(rng, 300, 16)
    big = centres[rng.integers(0, 300, IVF_FROM)] + 0.05 * unit(rng, IVF_FROM, 16)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    index, desc = build_index(big)
    assert desc.startswith("IVF") and index.ntotal == IVF_FROM
    again = deserialize_index(serialize_index(index))
    assert again.nprobe == index.nprobe == 16  # the probe setting is part of the stored index
    queries = big[rng.integers(0, IVF_FROM, 200)]
    _, found = again.search(queries, 1)
    exact = (queries @ big.T).argmax(1)
    assert np.mean(found[:, 0] == exact) > 0.95
