"""Shared fixtures: the loopback LLM server, an in-process CLI runner, and a subprocess one for
checks that need a real process (exit codes, one-line errors, kill -9)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from llm_server import FakeLLMServer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _share_the_cpus_between_workers() -> None:
    """`make test` runs pytest-xdist workers: each gets its own share of the CPUs (children inherit
    it), so that torch's OpenMP threads and llama.cpp's, which spin while they wait for each other,
    never outnumber the cores under them (oversubscribed, both run several times slower)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = cpus[int(worker[2:]) % count::count] if len(cpus) >= count else cpus  # fewer CPUs: one thread each
    os.sched_setaffinity(0, share)
    threads = len(share) if len(cpus) >= count else 1
    given = os.environ.get("OMP_NUM_THREADS", "")
    # read when torch loads, here and in every child; a smaller value set by the user stands
    os.environ["OMP_NUM_THREADS"] = str(min(threads, int(given)) if given.isdigit() and int(given) > 0 else threads)


_share_the_cpus_between_workers()
# A background job of a non-interactive shell (`make test &` in a script) starts with SIGINT
# ignored, and children inherit that: the tests that press Ctrl-C on a uniil process would see it
# ignored. Children of a process with a SIGINT handler start with the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("COLUMNS", "200")  # rich tables unwrapped, so tests can read them
# uniil-micro's weights (shipped, or trained by `uniil backbone build`): tests that point
# UNIIL_CACHE_DIR elsewhere still share them.
os.environ.setdefault("UNIIL_BACKBONE_DIR", str(Path.home() / ".cache" / "uniil" / "backbones"))


def pytest_collection_modifyitems(items):
    """Files holding a test marked `long` run first. `make test` deals whole files to its workers in
    collection order (--dist loadfile --no-loadscope-reorder): a file of minutes dealt last would
    leave the other workers idle while it runs."""
    long_files = {item.path for item in items if item.get_closest_marker("long")}
    items.sort(key=lambda item: item.path not in long_files)  # stable: the rest keep their order


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str) -> CliResult:
    """`uniil ARGS` in this process (fast: imports are shared between calls)."""
    from uniil.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


def run_uniil_process(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`uniil ARGS` as a real process."""
    return subprocess.run([sys.executable, "-m", "uniil.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def run_metrics(run: Path):
    """A run directory's metrics.json, read through the typed record the engine writes."""
    from uniil.trainer.records import METRICS_FILE, MetricsRecord

    return MetricsRecord.load(Path(run) / METRICS_FILE)


def free_port() -> int:
    """A loopback port nothing listens on (just released by the OS)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A feature/match cache of the module's own (UNIIL_CACHE_DIR), shared by its tests."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("UNIIL_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def llm_server():
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def cli():
    return run_cli


def server_args(server: FakeLLMServer, *extra: str) -> list[str]:
    """Build options for a small, fast build against the loopback server."""
    return ["--llm-url", server.base_url, "--llm-model", "test-model", "--clip-model", "uniil-tiny",
            "--backoff", "0.01", *extra]
