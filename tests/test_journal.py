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
from uniil.attrpool import writer as writer_module
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


def test_a_failed_commit_stops_the_writer_keeps_the_journal_and_replay_sets_aside_only_the_refused_call(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(writer_module, "COMMIT_EVERY_S", 0.0)  # each call commits as soon as it comes
    pool, store = _finished_pool_with_requests(tmp_path)
    writer = PoolWriter(store)
    writer.record(call("k0", prompt_tokens="not a number"))  # a commit DuckDB refuses: the thread stops
    assert writer._done.wait(60)
    with pytest.raises(duckdb.Error, match="Conversion"):
        writer.record(call("k1"))  # the build stops, but this paid answer is journaled first
    with pytest.raises(duckdb.Error, match="Conversion"):
        writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.record(call("k2"))
    assert [json.loads(line)["call"]["request_key"] for line in journal_path(pool).read_text().splitlines()[1:]] \
        == ["k0", "k1"]
    store.close()
    caplog.set_level("INFO", logger="uniil.attrpool.journal")
    with PoolStore.open_for_write(pool) as store:  # the refused call is set aside, the good one kept
        assert store.con.execute("SELECT key, status FROM requests ORDER BY key").fetchall() == [
            ("k0", "pending"), ("k1", "answered"), ("k2", "pending"), ("k3", "pending")]
    assert not journal_path(pool).exists()
    (rejected,) = tmp_path.glob("p.duckdb.journal.rejected-*")
    (entry,) = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert entry["call"]["request_key"] == "k0" and "Conversion" in entry["refused"]
    assert "refused 1 call(s)" in caplog.text and "replayed 1 call(s)" in caplog.text


def test_a_damaged_journal_is_a_one_line_error_and_an_empty_one_is_removed(tmp_path):
    pool, store = _finished_pool_with_requests(tmp_path)
    journal = CallJournal(store)
    journal.append(1, call("k0"), None)
    journal.close(remove=False)
    store.close()
    text = journal_path(pool).read_text().splitlines()
    journal_path(pool).write_text("\n".join([text[0], "{not json", text[1]]) + "\n")
    with pytest.raises(UserError, match=r"p\.duckdb\.journal is damaged \(line 2 .*move it elsewhere"):
        PoolStore.open_for_write(pool)
    journal_path(pool).write_text("")  # killed before its first line was written
    with PoolStore.open_for_write(pool) as store:
        assert store.count_requests("pending") == 4
    assert not journal_path(pool).exists()


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


def test_a_failed_first_build_keeps_its_work_file_while_a_journal_holds_answers(tmp_path):
    from uniil.attrpool.build import _close

    pool = tmp_path / "p.duckdb"
    store = PoolStore.open_for_write(pool)  # a first build: the work file is new
    store.add_requests(REQUESTS)
    journal = CallJournal(store)
    journal.append(store.take_call_ids(1)[0], call("k0"), None)  # paid for, never committed
    journal.close(remove=False)
    _close(store, pool, "failed", created=True)
    assert partial_path(pool).exists() and journal_path(partial_path(pool)).exists()
    with PoolStore.open_for_write(pool) as store:
        assert store.count_requests("answered") == 1


def test_a_ctrl_c_while_close_waits_lets_the_commit_finish_first(tmp_path, monkeypatch):
    """A second Ctrl-C during close() must not hand the pool's connection back while the writer's
    thread still commits on it."""
    import time

    pool, store = _finished_pool_with_requests(tmp_path)
    commit = PoolStore.record_calls

    def slow_commit(self, *args, **kwargs):  # on the writer's thread: Ctrl-C once close() waits for it
        while not writer._closing:
            time.sleep(0.01)
        time.sleep(0.2)  # close() has set the flag; let it reach its wait
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(PoolStore, "record_calls", slow_commit)
    writer = PoolWriter(store)
    writer.record(call("k0"))
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    assert writer._done.is_set()  # the thread had finished when the interrupt came out of close()
    assert store.count_requests("answered") == 1 and not journal_path(pool).exists()
    store.close()
