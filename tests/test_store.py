"""The pool file: derived tables swap atomically; a failed swap leaves the previous ones intact."""

import numpy as np
import pytest

from uniil.attrpool.store import PoolStore


def test_failed_attribute_swap_keeps_previous_attributes(tmp_path):
    pool = tmp_path / "p.duckdb"
    store = PoolStore.open_for_write(pool)
    emb = np.eye(2, 4, dtype=np.float32)
    store.replace_attributes(4, [(0, "class", "red"), (1, "class", "blue")], emb,
                             [(0, "class", "x", "t@v1", "Red", 1), (1, "class", "x", "t@v1", "Blue", 1)], b"idx", "Flat", {})
    with pytest.raises(Exception):
        # A provenance row of the wrong shape fails mid-transaction.
        store.replace_attributes(4, [(0, "class", "green")], emb[:1], [(0, "class")], b"idx2", "Flat", {})
    assert [t for (t,) in store.con.execute("SELECT text FROM attributes ORDER BY id").fetchall()] == ["red", "blue"]
    assert store.con.execute("SELECT blob FROM faiss_index").fetchone()[0] == b"idx"
    store.finish(pool)
    assert pool.exists() and not (tmp_path / "p.duckdb.partial").exists()
