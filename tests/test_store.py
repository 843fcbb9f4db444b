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


# -- bulk writes: every batch goes in as one relation; the rows must be what row-by-row inserts wrote --

from uniil.attrpool.store import CallRecord  # noqa: E402

CALL_COLUMNS = ("id, request_key, backend, base_url, model, template, form, prompt_hash, structured, attempt, "
                "status, error, response, latency_s, prompt_tokens, completion_tokens")
REQUESTS = [("k1", "class", "red 'apple'", "t@v1", "chat", "m", 8, '{"messages": [{"content": "é \\" ;"}]}'),
            ("k2", "class", "ünïcode", "t@v1", "chat", "m", 8, '{"messages": []}'),
            ("k3", "domain", "sketch", "d@v2", "completion", "m", 4, '{"prompt": "x\\ny"}'),
            ("k4", "class", "pear", "t@v1", "chat", "m", 8, '{"messages": []}')]
CALLS = [CallRecord("k1", "server", "http://h/v1", "m", "t@v1", "chat", "h1", "json_schema", 0, "error",
                    error="HTTP 429: slow down"),
         CallRecord("k1", "server", "http://h/v1", "m", "t@v1", "chat", "h1", "json_schema", 1, "ok",
                    response='{"attributes": ["red skin", "round"]}', latency_s=0.25, prompt_tokens=12,
                    completion_tokens=7),
         CallRecord("k2", "server", None, "m", "t@v1", "chat", "h2", None, 0, "unusable", response="[]",
                    latency_s=0.5),
         CallRecord("k3", "batch", None, "m", "d@v2", "completion", "h3", None, 0, "ok", response=" pencil lines",
                    prompt_tokens=3, completion_tokens=2)]


def _rows(con, table: str, columns: str = "*") -> list[tuple]:
    return con.execute(f"SELECT {columns} FROM {table} ORDER BY ALL").fetchall()


def test_bulk_writes_store_exactly_what_row_by_row_inserts_stored(tmp_path):
    bulk = PoolStore.open_for_write(tmp_path / "bulk.duckdb")
    bulk.add_sources("ds", "class", ("red 'apple'", "ünïcode", "pear"))
    bulk.add_sources("ds", "domain", ("sketch",))
    bulk.add_sources("ds", "class", ("red 'apple'", "new one"))  # known names are kept where they were
    bulk.add_requests(REQUESTS[:2])
    bulk.add_requests(REQUESTS)  # the first two again: ignored, as INSERT OR IGNORE did
    ids = bulk.record_calls(CALLS[:2]) + bulk.record_calls(CALLS[2:], failed=["k2"])
    assert ids == [1, 2, 3, 4]  # in call order, as the sequence numbered them
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    bulk.store_phrase_vectors("e", ["red skin", "round", "pencil lines"], vectors)
    bulk.store_phrase_vectors("e", ["round"], vectors[:1] + 1)  # a known phrase keeps its first vector
    attributes = [(0, "class", "red skin"), (1, "class", "round"), (2, "domain", "pencil lines")]
    provenance = [(0, "class", "red 'apple'", "t@v1", "red skin", 2), (1, "class", "red 'apple'", "t@v1", "round", 2),
                  (2, "domain", "sketch", "d@v2", "pencil lines", 4)]
    bulk.replace_attributes(4, attributes, vectors, provenance, b"index", "Flat", {"dim": "4"})

    # The reference: the same content written the way the store wrote it before, one row per statement.
    ref = PoolStore.open_for_write(tmp_path / "ref.duckdb")
    for i, name in enumerate(("red 'apple'", "ünïcode", "pear")):
        ref.con.execute("INSERT OR IGNORE INTO sources VALUES ('class', ?, 'ds', ?)", [name, i])
    ref.con.execute("INSERT OR IGNORE INTO sources VALUES ('domain', 'sketch', 'ds', 0)")
    for i, name in enumerate(("red 'apple'", "new one")):
        ref.con.execute("INSERT OR IGNORE INTO sources VALUES ('class', ?, 'ds', ?)", [name, i])
    for row in REQUESTS:
        ref.con.execute("INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL)", row)
    for call_id, c in enumerate(CALLS, 1):
        ref.con.execute(f"INSERT INTO llm_calls ({CALL_COLUMNS}) VALUES ({', '.join('?' * 16)})",
                        [call_id, c.request_key, c.backend, c.base_url, c.model, c.template, c.form, c.prompt_hash,
                         c.structured, c.attempt, c.status, c.error, c.response, c.latency_s, c.prompt_tokens,
                         c.completion_tokens])
    ref.con.execute("UPDATE requests SET status = 'answered', answer_call = 2 WHERE key = 'k1'")
    ref.con.execute("UPDATE requests SET status = 'failed', answer_call = NULL WHERE key = 'k2'")
    ref.con.execute("UPDATE requests SET status = 'answered', answer_call = 4 WHERE key = 'k3'")
    for text, vec in zip(["red skin", "round", "pencil lines"], vectors):
        ref.con.execute("INSERT OR IGNORE INTO phrase_vectors VALUES ('e', ?, ?)", [text, vec.tolist()])
    ref.con.execute("CREATE TABLE attributes (id INTEGER PRIMARY KEY, kind VARCHAR, text VARCHAR, embedding FLOAT[4])")
    for (i, kind, text), vec in zip(attributes, vectors):
        ref.con.execute("INSERT INTO attributes VALUES (?, ?, ?, ?)", [i, kind, text, vec.tolist()])
    for row in provenance:
        ref.con.execute("INSERT INTO provenance VALUES (?, ?, ?, ?, ?, ?)", row)

    for table, columns in [("sources", "*"), ("requests", "*"), ("llm_calls", CALL_COLUMNS),
                           ("phrase_vectors", "*"), ("attributes", "*"), ("provenance", "*")]:
        assert _rows(bulk.con, table, columns) == _rows(ref.con, table, columns), table
    assert _rows(bulk.con, "requests", "key, status, answer_call") == [
        ("k1", "answered", 2), ("k2", "failed", None), ("k3", "answered", 4), ("k4", "pending", None)]
    bulk.close()
    ref.close()


def test_call_ids_continue_after_reopening_and_a_failed_batch_changes_nothing(tmp_path):
    path = tmp_path / "p.duckdb"
    store = PoolStore.open_for_write(path)
    store.add_requests(REQUESTS)
    assert store.record_calls(CALLS[:2]) == [1, 2]
    with pytest.raises(Exception):
        store.record_calls([CallRecord("k4", "server", None, "m", "t@v1", "chat", "h", None, 0, "ok",
                                       prompt_tokens="not a number")])
    assert _rows(store.con, "requests", "key, status") == [("k1", "answered"), ("k2", "pending"),
                                                            ("k3", "pending"), ("k4", "pending")]
    store.close()
    store = PoolStore.open_for_write(path)  # a later build numbers its calls after the recorded ones
    assert store.record_calls(CALLS[3:]) == [3]
    assert _rows(store.con, "llm_calls", "id, request_key, status") == [(1, "k1", "error"), (2, "k1", "ok"),
                                                                        (3, "k3", "ok")]
    store.close()
