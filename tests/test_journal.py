"""The call journal: a killed build keeps every call its workers moved on from, each replayed once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import duckdb
import pytest

from uniil.attrpool.journal import CallJournal, journal_path
from uniil.attrpool.store import CallRecord, PoolStore, partial_path
from uniil.attrpool.writer import PoolWriter
from uniil.errors import UserError

REQUESTS = [(f"k{i}", "class", f"c{i}", "t@v1", "chat", "m", 8, "{}") for i in range(4)]


def call(key: str, status: str = "ok", **kw) -> CallRecord:
    return CallRecord(key, "server", "http://h/v1", "m", "t@v1", "chat", "h", None, 0, status,
                      response=kw.pop("response", '{"attributes": ["ünïcode red"]}'), **kw)


def _calls(path) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT id, request_key, status, response FROM llm_calls ORDER BY id").fetchall()
    finally:
        con.close()


def _finished_pool_with_requests(tmp_path):
    pool = tmp_path / "p.duckdb"
    PoolStore.open_for_write(pool).finish(pool)
    store = PoolStore.open_for_write(pool)
    store.add_requests(REQUESTS)
    return pool, store


KILLED_WRITER = """
import os, signal, sys
from uniil.attrpool import writer
from uniil.attrpool.store import CallRecord, PoolStore
writer.COMMIT_EVERY_S = 600  # the first batch is still gathering when the process dies
store = PoolStore.open_for_write(sys.argv[1])
store.add_requests([(f"k{i}", "class", f"c{i}", "t@v1", "chat", "m", 8, "{}") for i in range(4)])
store.con.execute("CHECKPOINT")
w = writer.PoolWriter(store)
mk = lambda key, status, **kw: CallRecord(key, "server", None, "m", "t@v1", "chat", "h", None, 0, status, **kw)
w.record(mk("k0", "error", error="HTTP 429"))
w.record(mk("k0", "ok", response="red"))
w.record(mk("k1", "ok", response="blue"))
w.record(failed="k2")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_build_loses_no_call_it_journaled(tmp_path):
    pool = tmp_path / "p.duckdb"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(pool)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    work = partial_path(pool)  # an unfinished pool's work file
    assert _calls(work) == []  # nothing was committed: the calls live in the journal only
    assert journal_path(work).exists()
    with PoolStore.open_for_write(pool) as store:
        assert store.con.execute("SELECT id, request_key, status, response FROM llm_calls ORDER BY id").fetchall() == [
            (1, "k0", "error", None), (2, "k0", "ok", "red"), (3, "k1", "ok", "blue")]
        assert store.con.execute("SELECT key, status, answer_call FROM requests ORDER BY key").fetchall() == [
            ("k0", "answered", 2), ("k1", "answered", 3), ("k2", "failed", None), ("k3", "pending", None)]
        assert store.take_call_ids(1) == [4]  # the next build numbers its calls after the replayed ones
    assert not journal_path(work).exists()


def test_replay_adds_only_what_the_pool_lacks_and_ignores_a_line_cut_short(tmp_path):
    pool, store = _finished_pool_with_requests(tmp_path)  # a finished pool: its journal lies beside it
    journal = CallJournal(store)
    for i, c in enumerate([call("k0"), call("k1"), call("k2", "unusable")], 1):
        journal.append(i, c, None)
    store.record_calls([call("k0")], ids=[1])  # committed before the crash; 2 and 3 were not
    journal.close(remove=False)
    with open(journal_path(pool), "ab") as fh:
        fh.write(b'{"id": 4, "call": {"request_key": "k3", "bac')  # the kill came mid-write
    store.close()
    with PoolStore.open_for_write(pool) as store:
        assert store.con.execute("SELECT id, request_key, status FROM llm_calls ORDER BY id").fetchall() == [
            (1, "k0", "ok"), (2, "k1", "ok"), (3, "k2", "unusable")]
        assert store.count_requests("answered") == 2 and store.count_requests("pending") == 2
    assert not journal_path(pool).exists()


def test_a_journal_of_another_pool_is_set_aside_not_replayed(tmp_path):
    other, pool = tmp_path / "other.duckdb", tmp_path / "p.duckdb"
    for p in (other, pool):
        PoolStore.open_for_write(p).finish(p)
    with PoolStore.open_for_write(other) as store:
        journal = CallJournal(store)
        journal.append(1, call("k0"), None)
        journal.close(remove=False)
    os.replace(journal_path(other), journal_path(pool))
    with PoolStore.open_for_write(pool) as store:
        assert store.con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 0
    assert not journal_path(pool).exists()
    aside = list(tmp_path.glob("p.duckdb.journal.orphan-*"))
    assert len(aside) == 1 and json.loads(aside[0].read_text().splitlines()[1])["call"]["request_key"] == "k0"


def test_a_failed_commit_stops_the_writer_and_keeps_the_journal(tmp_path):
    pool, store = _finished_pool_with_requests(tmp_path)
    writer = PoolWriter(store)
    writer.record(call("k0"))
    writer.record(call("k1", prompt_tokens="not a number"))  # a commit DuckDB refuses
    with pytest.raises(Exception, match="not a number|Conversion"):
        writer.close()
    assert json.loads(journal_path(pool).read_text().splitlines()[1])["call"]["request_key"] == "k0"
    with pytest.raises(Exception):
        writer.record(call("k2"))  # the build stops: nothing more is taken
    store.close()
    with pytest.raises(UserError, match=r"cannot replay p\.duckdb\.journal .*move p\.duckdb\.journal elsewhere"):
        PoolStore.open_for_write(pool)
    os.replace(journal_path(pool), tmp_path / "kept.journal")
    with PoolStore.open_for_write(pool) as store:
        assert store.count_requests("pending") == 4


def test_a_writer_closed_cleanly_commits_everything_and_removes_its_journal(tmp_path):
    pool, store = _finished_pool_with_requests(tmp_path)
    writer = PoolWriter(store)
    for k in ("k0", "k1", "k2"):
        writer.record(call(k))
    writer.record(failed="k3")
    writer.close()
    assert not journal_path(pool).exists()
    assert store.con.execute("SELECT key, status, answer_call FROM requests ORDER BY key").fetchall() == [
        ("k0", "answered", 1), ("k1", "answered", 2), ("k2", "answered", 3), ("k3", "failed", None)]
    store.close()
