"""The real embedded LLM (SmolLM2-135M GGUF): as `--llm local` runs it (llama-cpp-python's server in a
child process that uniil starts and stops), what happens when that process dies, and the same
server started by hand and reached with --llm-url."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import duckdb
import pytest

from conftest import free_port, run_metrics, run_uniil_process

pytestmark = [pytest.mark.llm, pytest.mark.slow]
llama_cpp = pytest.importorskip("llama_cpp", reason="the `local` extra (llama-cpp-python) is not installed")


def gguf_path():
    from uniil.attrpool.llm import default_gguf

    return default_gguf()


def test_local_model_builds_a_pool(cli, tmp_path):
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
    assert not _model_servers(os.getpid())  # the model process was stopped with the build


def test_installed_llama_cpp_leaves_out_the_amx_kernels_and_fits_this_cpu():
    """The compile that `make venv` ran: never llama.cpp's AMX path (it segfaults on AMX CPUs), and
    built for this machine's own instruction sets (a wheel for another CPU is not picked up)."""
    from uniil.attrpool.llama_install import cpu_flags

    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, info
    if "avx2" in cpu_flags():
        assert "AVX2 = 1" in info, info
    check = subprocess.run([sys.executable, "-m", "uniil.attrpool.llama_install", "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def _model_servers(parent: int) -> list[int]:
    """Pids of uniil's embedded-model server processes whose parent is `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"uniil.attrpool.local_server" in cmd:
            found.append(int(entry))
    return found


def _wait_for_model_server(build: subprocess.Popen, answers: int = 0, timeout: float = 180) -> tuple[int, str]:
    """The build's model process and its log, once it has answered `answers` requests."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert build.poll() is None, build.communicate()
        pids = _model_servers(build.pid)
        if pids:
            log = os.readlink(f"/proc/{pids[0]}/fd/2")  # its stderr: the request log
            served = open(log, errors="replace").read().count('HTTP/1.1" 200')
            if served >= answers:
                return pids[0], log
        time.sleep(0.1)
    raise AssertionError("the embedded model server did not answer in time")


def _build_args(pool, *extra):
    return [sys.executable, "-m", "uniil.cli", "attrs", "build", "--pool", str(pool), "--dataset", "synthetic",
            "--domains", "", "--templates", "class-appearance,class-identify", "--llm", "local", "--clip-model", "uniil-tiny",
            "--concurrency", "2", *map(str, extra)]


def test_a_crash_of_the_model_process_ends_the_build_in_one_line_and_keeps_its_answers(tmp_path):
    pool = tmp_path / "p.duckdb"
    env = {**os.environ, "COLUMNS": "200"}
    build = subprocess.Popen(_build_args(pool), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        server, _ = _wait_for_model_server(build, answers=3)
        os.kill(server, signal.SIGSEGV)  # what an AMX-built llama.cpp does in its first decode
        out, err = build.communicate(timeout=120)
    finally:
        build.kill()
    assert build.returncode == 1, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"pid {server}" in lines[0] and "signal 11 (SIGSEGV)" in lines[0] and "--llm-url" in lines[0]
    assert not pool.exists()  # no finished pool; the work file keeps what was paid for
    con = duckdb.connect(str(pool.with_name(pool.name + ".partial")), read_only=True)
    kept = {k for (k,) in con.execute("SELECT request_key FROM llm_calls WHERE status = 'ok'").fetchall()}
    con.close()
    assert 3 <= len(kept) < 48

    rerun = subprocess.run(_build_args(pool), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _reused(rerun.stdout) == len(kept)
    con = duckdb.connect(str(pool), read_only=True)
    ok = dict(con.execute("SELECT request_key, count(*) FROM llm_calls WHERE status = 'ok' GROUP BY ALL").fetchall())
    con.close()
    assert len(ok) == 48 and set(ok.values()) == {1}  # every prompt answered once: none asked twice
    assert not _model_servers(os.getpid())


def _reused(table: str) -> int:
    for line in table.splitlines():
        if "answers reused from the pool" in line:
            return int(line.split("answers reused from the pool", 1)[1].replace("│", " ").split()[0])
    raise AssertionError(table)


def test_the_model_process_does_not_outlive_a_killed_build(tmp_path):
    build = subprocess.Popen(_build_args(tmp_path / "p.duckdb"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    server, _ = _wait_for_model_server(build)
    build.kill()  # kill -9: uniil cannot stop its child itself
    build.wait()
    deadline = time.time() + 10
    while _alive(server) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(server), "the model server outlived the build"


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited (its parent, init, reaps it)


def test_a_file_that_is_not_a_model_is_one_line_and_leaves_no_pool(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf file" * 100)
    pool = tmp_path / "p.duckdb"
    args = [a if a != "local" else f"local:{fake}" for a in _build_args(pool)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken.gguf" in lines[0] and "--llm-url" in lines[0], r.stderr
    assert not pool.exists() and not pool.with_name(pool.name + ".partial").exists()


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
@pytest.mark.timeout(1800)
@pytest.mark.long
def test_demo_builds_the_synthetic_pool_offline(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path / "cache"))
    # One epoch instead of the demo's two: the same pipeline, half the training (slow machines).
    r = cli("demo", "--workdir", tmp_path / "demo", "--epochs", "1")
    assert r.code == 0, r.err
    config = json.loads((tmp_path / "demo" / "runs" / "mage" / "config.json").read_text())["config"]
    assert (config["epochs"], config["synthetic_train_per_class"]) == (1, 100)
    s = json.loads(cli("attrs", "stats", "--pool", tmp_path / "demo" / "synthetic.duckdb", "--json").out)
    assert (s["classes"], s["domains"], s["failed_calls"]) == (24 + 10 + 10, 5 + 1 + 1, 0)  # shapes, digits, patterns
    assert "synthetic/test/sketch/0" in r.out  # the match step ran on rendered images
    assert "uniil-micro@v4" in r.out and "the reference descriptions" in r.out  # the backbone and its figures
    ref = json.loads(cli("attrs", "stats", "--pool", tmp_path / "demo" / "reference.duckdb", "--json").out)
    assert (ref["classes"], ref["domains"], ref["failed_calls"]) == (24 + 10 + 10, 5 + 1 + 1, 0)
    assert ref["models"] and all(m.startswith("file:") for m in ref["models"])  # imported, not asked of the LLM
    from uniil.trainer.demo import DEMO_RUNS

    for name, _, _, _ in DEMO_RUNS:  # every method trained on synthetic-uniil and compared
        m = run_metrics(tmp_path / "demo" / "runs" / name)
        assert m.finished_steps == 7 and m.class_il.last is not None
        assert name in r.out
    assert (tmp_path / "demo" / "report" / "report.html").stat().st_size > 10_000
    again = cli("demo", "--workdir", tmp_path / "demo", "--epochs", "1")  # reuses the pool and the finished runs
    assert again.code == 0 and "HTTP requests made" in again.out
