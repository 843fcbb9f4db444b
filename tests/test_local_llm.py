"""The real embedded LLM (SmolLM2-135M GGUF): in-process, and behind llama-cpp-python's own
OpenAI-compatible server on loopback, started and stopped here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import duckdb
import pytest

from conftest import free_port, run_uniil_process

pytestmark = [pytest.mark.llm, pytest.mark.slow]
llama_cpp = pytest.importorskip("llama_cpp", reason="the `local` extra (llama-cpp-python) is not installed")


def gguf_path():
    from uniil.attrpool.llm import default_gguf

    return default_gguf()


def test_local_model_in_process_builds_a_pool(cli, tmp_path):
    classes = tmp_path / "c.txt"
    classes.write_text("zebra\nfire truck\nstar\n")
    pool = tmp_path / "p.duckdb"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes, "--domains", "sketch,inverted",
            "--templates", "class-appearance,domain-style", "--llm", "local", "--clip-model", "uniil-tiny")
    assert r.code == 0, r.err
    s = json.loads(cli("attrs", "stats", "--pool", pool, "--json").out)
    assert s["llm_calls"] == 5 and s["models"] == ["local:SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert s["attributes"] >= 5
    con = duckdb.connect(str(pool), read_only=True)
    backends = con.execute("SELECT DISTINCT backend, form FROM llm_calls").fetchall()
    assert backends == [("local", "completion")]
    zebra = json.loads(cli("attrs", "list", "--pool", pool, "--class", "zebra", "--json").out)["zebra"]
    assert zebra and all(a != "zebra" for a in zebra)


@pytest.fixture
def llama_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "llama_server.log", "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--model_alias", "smollm2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("llama_cpp.server did not start: " +
                                       (tmp_path / "llama_server.log").read_text(errors="replace")[-2000:])
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_llama_cpp_server_over_http(llama_server, tmp_path):
    classes = tmp_path / "c.txt"
    classes.write_text("zebra\nsunflower\n")
    pool = tmp_path / "p.duckdb"
    common = ["--classes", classes, "--domains", "", "--llm-url", llama_server, "--llm-model", "smollm2",
              "--clip-model", "uniil-tiny", "--concurrency", "2"]
    # Completion form: what small models answer well.
    proc = run_uniil_process("attrs", "build", "--pool", pool, "--templates", "class-appearance,class-identify",
                             "--form", "completion", *common)
    assert proc.returncode == 0, proc.stderr
    con = duckdb.connect(str(pool), read_only=True)
    assert con.execute("SELECT count(*) FROM requests WHERE status = 'answered'").fetchone()[0] == 4
    con.close()
    # Chat form: this server rejects json_schema with HTTP 500; the build steps down to json_object and
    # remembers it for the server, whatever the small model then answers.
    proc = run_uniil_process("attrs", "build", "--pool", pool, "--templates", "class-appearance",
                             "--retries", "2", *common)
    con = duckdb.connect(str(pool), read_only=True)
    assert con.execute("SELECT structured FROM server_caps").fetchall() == [("json_object",)]
    modes = {m for (m,) in con.execute("SELECT DISTINCT structured FROM llm_calls WHERE form = 'chat'").fetchall()}
    assert "json_object" in modes


@pytest.mark.slow
@pytest.mark.timeout(1800)  # on a fresh machine this test trains uniil-micro first (~5 min)
def test_demo_builds_the_synthetic_pool_offline(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path / "cache"))
    r = cli("demo", "--workdir", tmp_path / "demo")
    assert r.code == 0, r.err
    s = json.loads(cli("attrs", "stats", "--pool", tmp_path / "demo" / "synthetic.duckdb", "--json").out)
    assert (s["classes"], s["domains"], s["failed_calls"]) == (24 + 12, 5, 0)  # shapes and colours
    assert "synthetic/test/sketch/0" in r.out  # the match step ran on rendered images
    from uniil.cli import DEMO_RUNS

    for name, _, _ in DEMO_RUNS:  # every method trained on synthetic-uniil and compared
        m = json.loads((tmp_path / "demo" / "runs" / name / "metrics.json").read_text())
        assert m["finished_steps"] == 6 and m["last"] is not None
        assert name in r.out
    assert (tmp_path / "demo" / "report" / "report.html").stat().st_size > 10_000
    again = cli("demo", "--workdir", tmp_path / "demo")  # a rerun reuses the pool and the finished runs
    assert again.code == 0 and "HTTP requests made" in again.out
