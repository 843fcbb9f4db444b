"""`uniil attrs build` against a real OpenAI-compatible HTTP server on loopback, with injected faults."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from conftest import server_args
from llm_server import Fault, FakeLLMServer

SHAPES = ["circle", "square", "star"]


def classes_file(tmp_path: Path, names=SHAPES) -> Path:
    f = tmp_path / "classes.txt"
    f.write_text("\n".join(names) + "\n")
    return f


def stats(cli, pool: Path) -> dict:
    r = cli("attrs", "stats", "--pool", pool, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_build_records_every_call_and_indexes_attributes(cli, llm_server, tmp_path):
    pool = tmp_path / "p.duckdb"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "sketch,photo",
            "--templates", "class-appearance,class-identify,domain-style", *server_args(llm_server))
    assert r.code == 0, r.err
    s = stats(cli, pool)
    assert (s["classes"], s["domains"]) == (3, 2)
    assert s["llm_calls"] == 3 * 2 + 2 and s["failed_calls"] == 0
    assert s["backbone"] == "uniil-tiny@seed0" and s["dim"] == 128
    assert 0 < s["attributes"] <= s["raw_attributes"]
    assert len(llm_server.log) == 8  # one request per prompt, nothing retried
    con = duckdb.connect(str(pool), read_only=True)
    # Every request is logged with its prompt hash, response, status, latency and tokens.
    rows = con.execute("SELECT backend, model, template, prompt_hash, response, status, latency_s, "
                       "prompt_tokens, completion_tokens, structured FROM llm_calls").fetchall()
    assert len(rows) == 8
    for backend, model, template, phash, response, status, latency, pt, ct, structured in rows:
        assert (backend, model, status, structured) == ("server", "test-model", "ok", "json_schema")
        assert len(phash) == 64 and json.loads(response)["attributes"] and latency > 0 and pt > 0 and ct > 0
    # Embeddings are L2-normalised, the FAISS index has one vector per attribute and finds each one.
    import faiss
    import numpy as np
    emb = np.array([e for (e,) in con.execute("SELECT embedding FROM attributes ORDER BY id").fetchall()], np.float32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    blob = con.execute("SELECT blob FROM faiss_index").fetchone()[0]
    index = faiss.deserialize_index(np.frombuffer(blob, np.uint8))
    assert index.ntotal == len(emb)
    sims, ids = index.search(emb, 1)
    texts = [t for (t,) in con.execute("SELECT text FROM attributes ORDER BY id").fetchall()]
    assert np.allclose(sims[:, 0], 1.0, atol=1e-4)  # each finds itself (or its twin of the other kind)
    assert [texts[i] for i in ids[:, 0]] == texts
    # Provenance: every canonical attribute names the source, template and raw phrase behind it.
    prov = con.execute("SELECT DISTINCT attribute_id FROM provenance").fetchall()
    assert len(prov) == len(emb)
    star = con.execute("SELECT DISTINCT p.template FROM provenance p WHERE p.source_name = 'star'").fetchall()
    assert {t for (t,) in star} == {"class-appearance@v1", "class-identify@v1"}


def test_rerun_asks_nothing_and_reuses_answers(cli, llm_server, tmp_path):
    pool = tmp_path / "p.duckdb"
    args = ["attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance", *server_args(llm_server)]
    assert cli(*args).code == 0
    n = len(llm_server.log)
    r = cli(*args)
    assert r.code == 0, r.err
    assert len(llm_server.log) == n
    assert "up to date" in r.out
    # Adding a class asks only for the new one.
    r = cli(*(args[:5] + [classes_file(tmp_path, SHAPES + ["heart"])] + args[6:]))
    assert r.code == 0, r.err
    assert len(llm_server.log) == n + 1 and "heart" in llm_server.log[-1].prompt


def test_transient_faults_are_retried_and_retry_after_honoured(cli, llm_server, tmp_path):
    llm_server.add_fault(Fault("429", match="circle", retry_after=1))
    llm_server.add_fault(Fault("500", match="square", times=2))
    llm_server.add_fault(Fault("slow", match="star", delay_s=3))
    pool = tmp_path / "p.duckdb"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance", "--timeout", "1", *server_args(llm_server))
    assert r.code == 0, r.err
    circle = llm_server.requests_for("a circle")
    assert [c.status for c in circle] == [429, 200]
    assert circle[1].t - circle[0].t >= 0.95  # waited for Retry-After: 1 (a lower bound, not a timing budget)
    square = llm_server.requests_for("a square")
    assert [c.status for c in square] == [500, 500, 200]
    assert {(c.body["temperature"], c.body["seed"]) for c in square} == {(0.0, 0)}  # a cured fault: same request
    assert len(llm_server.requests_for("a star")) == 2  # timed out once, then answered
    s = stats(cli, pool)
    assert s["llm_calls"] == 3 and s["failed_calls"] == 0  # cured faults are not failures
    errors = duckdb.connect(str(pool), read_only=True).execute(
        "SELECT count(*) FROM llm_calls WHERE status = 'error'").fetchone()[0]
    assert errors == 4  # ...but every failed attempt is on record


def test_unusable_answers_are_retried_then_reported_per_class(cli, llm_server, tmp_path):
    llm_server.add_fault(Fault("malformed", match="circle"))  # truncated JSON: the fallback parser salvages it
    llm_server.add_fault(Fault("numbered", match="square"))  # plain numbered list: accepted
    llm_server.add_fault(Fault("prose", match="star"))  # JSON in a code fence inside prose: accepted
    llm_server.add_fault(Fault("empty", match="heart", times=-1))  # never a usable answer
    pool = tmp_path / "p.duckdb"
    args = ["attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path, SHAPES + ["heart"]),
            "--domains", "", "--templates", "class-appearance,class-identify", "--retries", "2",
            *server_args(llm_server)]
    r = cli(*args)
    assert r.code == 1
    assert "no usable answer for 1 source(s)" in r.err and "heart" in r.err
    heart = llm_server.requests_for("a heart")
    assert len(heart) == 4  # 2 templates x 2 tries
    assert sorted(c.body["temperature"] for c in heart) == [0.0, 0.0, 0.8, 0.8]  # resampled after junk
    assert not pool.exists()  # no half-written pool...
    part = pool.with_name(pool.name + ".partial")
    assert part.exists()  # ...but the paid answers are kept for the rerun
    llm_server.faults.clear()
    n = len(llm_server.log)
    r = cli(*args)
    assert r.code == 0, r.err
    assert len(llm_server.log) == n + 2  # only heart's two prompts are asked again
    assert pool.exists() and not part.exists()
    listed = json.loads(cli("attrs", "list", "--pool", pool, "--class", "square", "--json").out)
    assert listed["square"]


def test_answers_in_parts_and_token_counts_that_are_not_integers_are_recorded(cli, llm_server, tmp_path):
    llm_server.add_fault(Fault("odd_shapes", match="circle", times=-1))
    pool = tmp_path / "p.duckdb"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance", *server_args(llm_server))
    assert r.code == 0, r.err
    con = duckdb.connect(str(pool), read_only=True)
    rows = con.execute("SELECT r.source_name, c.response, c.prompt_tokens, c.completion_tokens FROM requests r "
                       "JOIN llm_calls c ON c.id = r.answer_call ORDER BY 1").fetchall()
    con.close()
    circle = rows[0]
    assert circle[0] == "circle" and json.loads(circle[1])["attributes"]  # the parts joined into one answer
    assert circle[2:] == (None, 3)  # "12" is not a count; 3.5 is stored as 3
    assert all(isinstance(r[2], int) for r in rows[1:])


def test_some_failed_prompts_still_finish_the_pool_and_are_counted(cli, llm_server, tmp_path):
    llm_server.add_fault(Fault("empty", match="How can you identify a star", times=-1))
    pool = tmp_path / "p.duckdb"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance,class-identify", "--retries", "2", *server_args(llm_server))
    assert r.code == 0, r.err
    assert "star (1)" in r.out
    s = stats(cli, pool)
    assert s["failed_calls"] == 1 and s["llm_calls"] == 5


def test_structured_mode_steps_down_and_is_remembered(cli, tmp_path):
    with FakeLLMServer(accepts=("json_object",)) as server:  # like llama.cpp's server
        pool = tmp_path / "p.duckdb"
        args = ["attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
                "--templates", "class-appearance", "--concurrency", "1", *server_args(server)]
        assert cli(*args).code == 0
        types = [(r.body.get("response_format") or {}).get("type") for r in server.log]
        assert types[0] == "json_schema" and types[1:] == ["json_object"] * 3
        assert server.log[1].body["response_format"]["schema"]["properties"]["attributes"]["maxItems"] == 8
        assert all(r.body["max_tokens"] for r in server.log)
        server.log.clear()
        assert cli(*(args[:5] + [classes_file(tmp_path, ["heart"])] + args[6:])).code == 0
        assert [(r.body.get("response_format") or {}).get("type") for r in server.log] == ["json_object"]
    with FakeLLMServer(accepts=()) as server:  # takes no response_format at all
        r = cli("attrs", "build", "--pool", tmp_path / "q.duckdb", "--classes", classes_file(tmp_path),
                "--domains", "", "--templates", "class-appearance", "--concurrency", "1", *server_args(server))
        assert r.code == 0, r.err
        assert "response_format" not in server.log[-1].body


def test_request_budget_stops_and_rerun_asks_only_the_rest(cli, llm_server, tmp_path):
    pool = tmp_path / "p.duckdb"
    args = ["attrs", "build", "--pool", pool, "--dataset", "synthetic", "--domains", "",
            "--templates", "class-appearance", "--concurrency", "1", *server_args(llm_server)]
    r = cli(*args, "--max-requests", "5")
    assert r.code == 1 and "--max-requests 5 spent: 19 prompt(s) not asked yet" in r.err
    assert len(llm_server.log) == 5
    first = {r.prompt for r in llm_server.log}
    llm_server.log.clear()
    assert cli(*args).code == 0
    second = [r.prompt for r in llm_server.log]
    assert len(second) == 19 and not first & set(second)


def test_batch_file_and_ingest_round_trip(cli, llm_server, tmp_path):
    import httpx2

    pool = tmp_path / "p.duckdb"
    batch = tmp_path / "requests.jsonl"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "sketch",
            "--templates", "class-appearance,domain-style", "--batch-file", batch, *server_args(llm_server))
    assert r.code == 0, r.err
    lines = [json.loads(ln) for ln in batch.read_text().splitlines()]
    assert len(lines) == 4 and not llm_server.log
    assert {ln["url"] for ln in lines} == {"/v1/chat/completions"} and all(ln["body"]["max_tokens"] for ln in lines)
    # Run the batch the way `vllm run-batch` would: each body against the server, one result line each.
    results = tmp_path / "results.jsonl"
    with httpx2.Client() as http, open(results, "w") as fh:
        for ln in lines:
            resp = http.post(llm_server.base_url.removesuffix("/v1") + ln["url"], json=ln["body"])
            fh.write(json.dumps({"id": "b", "custom_id": ln["custom_id"], "error": None,
                                 "response": {"status_code": resp.status_code, "body": resp.json()}}) + "\n")
    r = cli("attrs", "ingest", results, "--pool", pool)
    assert r.code == 0, r.err
    s = stats(cli, pool)
    assert s["llm_calls"] == 4 and s["attributes"] > 0 and s["domains"] == 1
    # Ingesting again changes nothing.
    assert cli("attrs", "ingest", results, "--pool", pool).code == 0
    assert stats(cli, pool)["llm_calls"] == 4


def test_export_and_list(cli, llm_server, tmp_path):
    pool = tmp_path / "p.duckdb"
    assert cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "sketch",
               "--templates", "class-appearance,domain-style", *server_args(llm_server)).code == 0
    exported = json.loads(cli("attrs", "export", "--pool", pool, "--format", "json").out)
    assert list(exported) == SHAPES  # class order is the dataset's
    assert all(isinstance(a, str) for attrs in exported.values() for a in attrs)
    assert any("star" in a for a in exported["star"])
    out = tmp_path / "attrs.csv"
    assert cli("attrs", "export", "--pool", pool, "--format", "csv", "--kind", "all", "-o", out).code == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "kind,source,attribute" and any(r.startswith("domain,sketch,") for r in rows)
    r = cli("attrs", "list", "--pool", pool, "--class", "dragon")
    assert r.code == 1 and "class 'dragon' is not in pool" in r.err


def test_api_key_is_sent_but_never_stored(cli, llm_server, tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MY_KEY", secret)
    pool = tmp_path / "p.duckdb"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance", "--api-key-env", "MY_KEY", *server_args(llm_server))
    assert r.code == 0, r.err
    assert llm_server.log[0].headers.get("authorization") == f"Bearer {secret}"
    assert secret.encode() not in pool.read_bytes()
    assert secret not in r.out + r.err


def test_build_pool_works_inside_a_running_event_loop(llm_server, tmp_path):
    """As in a Jupyter notebook, where an event loop is already running."""
    import asyncio

    from uniil.attrpool.build import BuildConfig, build_pool
    from uniil.attrpool.llm import LLMSpec
    from uniil.backbones.spec import BackboneSpec
    from uniil.data.registry import resolve_names

    cfg = BuildConfig(pool=tmp_path / "p.duckdb", names=resolve_names(None, classes_file(tmp_path), []),
                      llm=LLMSpec.from_options(None, llm_server.base_url, "m", None),
                      backbone=BackboneSpec.from_options("uniil-tiny", None), templates=["class-appearance"])

    async def notebook_cell():
        return build_pool(cfg)

    report = asyncio.run(notebook_cell())
    assert report.answered == 3 and report.stats["attributes"] > 0


def test_failed_rerun_leaves_a_finished_pool_as_it_was(cli, llm_server, tmp_path):
    pool = tmp_path / "p.duckdb"
    args = ["attrs", "build", "--pool", pool, "--domains", "", "--templates", "class-appearance", "--retries", "1",
            *server_args(llm_server)]
    assert cli(*args, "--classes", classes_file(tmp_path)).code == 0
    before = stats(cli, pool)
    exported = cli("attrs", "export", "--pool", pool).out
    llm_server.add_fault(Fault("empty", match="a heart", times=-1))
    r = cli(*args, "--classes", classes_file(tmp_path, SHAPES + ["heart"]))
    assert r.code == 1 and "no usable answer for 1 source(s)" in r.err and "heart" in r.err
    after = stats(cli, pool)
    assert (after["classes"], after["attributes"], after["llm_calls"]) == (3, before["attributes"], 3)
    assert after["failed_calls"] == 1  # the failed prompt is on record, and asked again by the next run
    assert cli("attrs", "export", "--pool", pool).out == exported
    assert cli("attrs", "list", "--pool", pool, "--class", "heart").code == 1
