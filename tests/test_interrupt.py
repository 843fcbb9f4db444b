"""Ctrl-C during a build: a one-line message, exit status 130, answers so far kept and not asked again."""

import json
import signal
import subprocess
import sys
import time

import duckdb

from llm_server import FakeLLMServer


def test_ctrl_c_keeps_answers_and_rerun_continues(tmp_path):
    pool = tmp_path / "p.duckdb"
    with FakeLLMServer(latency_s=0.2) as server:
        args = [sys.executable, "-m", "uniil.cli", "attrs", "build", "--pool", str(pool), "--dataset", "synthetic",
                "--domains", "", "--templates", "class-appearance", "--llm-url", server.base_url,
                "--llm-model", "m", "--clip-model", "uniil-tiny", "--concurrency", "1"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while sum(r.status == 200 for r in server.log) < 5 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert err.strip().splitlines()[-1].startswith("interrupted; finished work") and "Traceback" not in err
        con = duckdb.connect(str(pool) + ".partial", read_only=True)
        kept = {p for (p,) in con.execute("SELECT payload FROM requests WHERE status = 'answered'").fetchall()}
        con.close()
        assert len(kept) >= 4
        server.log.clear()
        assert subprocess.run(args, capture_output=True).returncode == 0
        asked = {json.dumps({"messages": r.body["messages"]}, sort_keys=True, ensure_ascii=False) for r in server.log}
        assert not kept & asked
