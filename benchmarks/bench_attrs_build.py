"""`uniil attrs build` performance targets (issue: attribute pool; tightened by issue 15):

1. against the loopback server at a fixed 200 ms latency, 100 classes x 3 templates at
   --concurrency 16 spend at most 1.2x the ideal (requests x 0.2 s / 16) asking, at most 1.5 ms
   of client CPU per request;
2. a rerun of a finished build makes 0 requests, loads no model, and finishes in under 1.5 s;
3. `uniil --help` answers in under 1 s.

benchmarks/bench_attrs_scale.py measures the same at 10,000 classes.

Run: .venv/bin/python benchmarks/bench_attrs_build.py
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LATENCY = 0.2
CONCURRENCY = 16


@contextlib.contextmanager
def loopback_server_process(latency: float):
    """The tests' OpenAI-compatible server, in a process of its own as a real server would be:
    (base URL, process)."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llm_server.py"), "--latency", str(latency),
                                 "--port-file", str(port_file)])
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port_file.read_text()}/v1", proc
        finally:
            proc.terminate()
            proc.wait()


@contextlib.contextmanager
def loopback_server(latency: float):
    with loopback_server_process(latency) as (url, _):
        yield url


def requests_served(url: str) -> int:
    return json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/stats").read())["requests"]


class Clock:
    """Progress hook that times the asking phase alone (start-up and derivation excluded): wall
    seconds, and this process's CPU seconds (the pool writer's thread included)."""

    def __init__(self):
        self.spans = {}
        self.cpu = {}

    def start(self, task, description, total):
        self.spans[task] = [time.perf_counter(), None]
        self.cpu[task] = time.process_time()

    def advance(self, task, n=1):
        pass

    def stop(self, task):
        self.spans[task][1] = time.perf_counter()
        self.cpu[task] = time.process_time() - self.cpu[task]


def bench_concurrency(workdir: Path) -> dict:
    from uniil.attrpool.build import BuildConfig, build_pool
    from uniil.attrpool.llm import LLMSpec
    from uniil.backbones.spec import BackboneSpec
    from uniil.data.registry import resolve_names

    with loopback_server(LATENCY) as url:
        names = resolve_names("cifar100", domains=[])
        cfg = BuildConfig(pool=workdir / "conc.duckdb", names=names,
                          llm=LLMSpec.from_options(None, url, "m", None),
                          backbone=BackboneSpec.from_options("uniil-tiny", None),
                          templates=["class-appearance", "class-identify", "class-distinguish"],
                          concurrency=CONCURRENCY)
        clock = Clock()
        report = build_pool(cfg, clock)
        start, stop = clock.spans["requests"]
        requests = requests_served(url)
    ideal = requests * LATENCY / CONCURRENCY
    return {"requests": requests, "answered": report.answered, "asking_s": stop - start, "ideal_s": ideal,
            "ratio": (stop - start) / ideal, "cpu_ms": clock.cpu["requests"] / requests * 1000}


def bench_rerun(workdir: Path) -> dict:
    """Rerun the finished build in a fresh process; report time, requests made and heavy modules loaded."""
    with loopback_server(LATENCY) as url:
        args = ["attrs", "build", "--pool", str(workdir / "conc.duckdb"), "--dataset", "cifar100", "--domains", "",
                "--templates", "class-appearance,class-identify,class-distinguish", "--llm-url", url,
                "--llm-model", "m", "--clip-model", "uniil-tiny", "--concurrency", str(CONCURRENCY)]
        probe = ("import sys; from uniil.cli import main\n"
                 "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
                 "heavy = [m for m in ('torch', 'open_clip', 'sentence_transformers', 'llama_cpp', 'faiss') "
                 "if m in sys.modules]\nprint('HEAVY', ','.join(heavy) or '-', file=sys.stderr)")
        times = []
        for _ in range(3):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            assert proc.returncode == 0 or "HEAVY" in proc.stderr, proc.stderr
        heavy = proc.stderr.split("HEAVY", 1)[1].strip()
        return {"requests": requests_served(url), "seconds": statistics.median(times), "heavy_modules": heavy}


def bench_help() -> dict:
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "uniil"), "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        c = bench_concurrency(workdir)
        print(f"concurrency: {c['requests']} requests at {LATENCY * 1000:.0f} ms, --concurrency {CONCURRENCY}: "
              f"asking took {c['asking_s']:.2f} s, ideal {c['ideal_s']:.2f} s, ratio {c['ratio']:.2f} (target <= 1.2), "
              f"client CPU {c['cpu_ms']:.2f} ms/request (target <= 1.5)")
        r = bench_rerun(workdir)
        print(f"rerun of a finished build: {r['seconds']:.2f} s (median of 3, target < 1.5 s), "
              f"{r['requests']} requests, heavy modules loaded: {r['heavy_modules']}")
    h = bench_help()
    print(f"uniil --help: {h['seconds']:.2f} s (median of 5, target < 1 s)")


if __name__ == "__main__":
    main()
