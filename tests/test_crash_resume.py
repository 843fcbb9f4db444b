"""A build killed mid-way (kill -9) loses no recorded answer and asks none of them again."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import duckdb

from llm_server import FakeLLMServer
from uniil.attrpool.store import PoolStore


def test_killed_build_resumes_without_asking_again(tmp_path):
    pool = tmp_path / "p.duckdb"
    args = [sys.executable, "-m", "uniil.cli", "attrs", "build", "--pool", str(pool), "--dataset", "synthetic",
            "--domains", "", "--templates", "class-appearance", "--concurrency", "2", "--clip-model", "uniil-tiny",
            "--llm-model", "m", "--backoff", "0.01"]
    with FakeLLMServer(latency_s=0.2) as server:
        proc = subprocess.Popen(args + ["--llm-url", server.base_url], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ})
        deadline = time.time() + 120
        while sum(r.status == 200 for r in server.log) < 8 and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert proc.returncode != 0 and not pool.exists()
        PoolStore.recover(pool)  # commits what the killed build had journaled, as its rerun does first
        work = pool.with_name(pool.name + ".partial")
        con = duckdb.connect(str(work))
        done = con.execute("SELECT r.payload FROM requests r WHERE status = 'answered'").fetchall()
        con.close()
        assert 6 <= len(done) < 24
        answered_prompts = {p for (p,) in done}

        server.log.clear()
        finished = subprocess.run(args + ["--llm-url", server.base_url], capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr
        import json
        asked_again = {json.dumps({"messages": r.body["messages"]}, sort_keys=True, ensure_ascii=False)
                       for r in server.log}
        assert not answered_prompts & asked_again
        assert len(server.log) <= 24 - len(done)

    con = duckdb.connect(str(pool), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM requests").fetchone() == (24, 24)
    assert con.execute("SELECT count(*) FROM requests WHERE status = 'answered'").fetchone()[0] == 24
    ok = con.execute("SELECT count(*), count(DISTINCT request_key) FROM llm_calls WHERE status = 'ok'").fetchone()
    assert ok == (24, 24)  # one recorded answer per prompt: nothing duplicated
    assert con.execute("SELECT count(*) FROM (SELECT attribute_id, source_name, template, raw_phrase, call_id, "
                       "count(*) c FROM provenance GROUP BY ALL HAVING c > 1)").fetchone()[0] == 0


def test_killed_build_with_batched_commits_loses_at_most_one_answer_per_worker(tmp_path):
    """Answers are journaled before their worker asks again, and committed in batches behind it, so at
    a kill -9 at most `concurrency` answers the server gave (those in flight) are missing from the pool."""
    import json

    concurrency = 8
    pool = tmp_path / "p.duckdb"
    args = [sys.executable, "-m", "uniil.cli", "attrs", "build", "--pool", str(pool), "--dataset", "synthetic",
            "--domains", "", "--templates", "class-appearance,class-identify,class-distinguish",
            "--concurrency", str(concurrency), "--clip-model", "uniil-tiny", "--llm-model", "m", "--backoff", "0.01"]
    with FakeLLMServer(latency_s=0.05) as server:
        proc = subprocess.Popen(args + ["--llm-url", server.base_url], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while sum(r.status == 200 for r in server.log) < 30 and time.time() < deadline:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        served = {json.dumps({"messages": r.body["messages"]}, sort_keys=True, ensure_ascii=False)
                  for r in server.log if r.status == 200}
        PoolStore.recover(pool)
        con = duckdb.connect(str(pool.with_name(pool.name + ".partial")))
        answered = {p for (p,) in con.execute("SELECT payload FROM requests WHERE status = 'answered'").fetchall()}
        # Every answered request points at its recorded answer.
        assert con.execute("SELECT count(*) FROM requests r JOIN llm_calls c ON c.id = r.answer_call "
                           "WHERE r.status = 'answered' AND c.status = 'ok'").fetchone()[0] == len(answered)
        con.close()
        assert answered <= served and 0 < len(answered) < 72
        assert len(served - answered) <= concurrency  # paid for but lost: at most one per worker

        server.log.clear()
        finished = subprocess.run(args + ["--llm-url", server.base_url], capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr
        asked = [json.dumps({"messages": r.body["messages"]}, sort_keys=True, ensure_ascii=False) for r in server.log]
        assert len(asked) == len(set(asked)) == 72 - len(answered) and not answered & set(asked)
    con = duckdb.connect(str(pool), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT request_key) FROM llm_calls WHERE status = 'ok'").fetchone() \
        == (72, 72)
    assert con.execute("SELECT count(*) FROM requests WHERE status = 'answered'").fetchone()[0] == 72
