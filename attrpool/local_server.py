"""The embedded LLM, run out of process: llama-cpp-python's OpenAI-compatible server on loopback.

`--llm local` starts this module as a child process on a free port, talks to it over HTTP exactly
as it talks to vLLM or any other server, and stops it when the build ends. llama.cpp is native
code: if it crashes (a segfault, an illegal instruction), only the child dies, and the build ends
with one line naming the signal and the fix, keeping every answer received so far.

Parent side: `LocalModelServer` (start, watch, stop). Child side: `main()`, run as
`python -m uniil.attrpool.local_server --model PATH --alias NAME --parent-pid PID` (started by the
`local` backend, backends/local.py); it prints one JSON line `{"port": ..., "system_info": ...}` on
stdout once the model is loaded and serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..common import usable_cpus

log = logging.getLogger(__name__)

EXIT_NOT_INSTALLED = 3
EXIT_AMX_BUILD = 4
REBUILD = "python -m uniil.attrpool.llama_install --force"
ELSEWHERE = "or serve a model elsewhere and pass --llm-url URL --llm-model NAME"
SIGNAL_HINTS = {
    "SIGSEGV": f"a llama.cpp crash; if it repeats, rebuild llama-cpp-python for this CPU ({REBUILD})",
    "SIGILL": f"llama-cpp-python was compiled for another CPU; rebuild it on this one ({REBUILD})",
    "SIGKILL": "killed from outside (out of memory?)",
}


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"signal {-returncode} ({name})" if name.startswith("SIG") else name
    return f"exit code {returncode}"


class LocalModelServer:
    """A llama.cpp server child process for one GGUF file."""

    def __init__(self, gguf: Path, alias: str, threads: int | None = None, start_timeout_s: float = 300.0,
                 n_ctx: int = 2048):
        self.gguf, self.alias = gguf, alias
        # llama.cpp's threads spin while they wait for each other: more threads than cores slows it several times
        self.threads = threads or max(1, min(usable_cpus(), 8))
        self.n_ctx = n_ctx
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.system_info = ""
        self._log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> int:
        """Start the child and wait until it serves; returns the port. Raises LocalModelError."""
        # stderr to a file, not a pipe: a full pipe would block the server mid-request.
        self._log = tempfile.NamedTemporaryFile(prefix="uniil-llm-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "uniil.attrpool.local_server", "--model", str(self.gguf),
               "--alias", self.alias, "--threads", str(self.threads), "--n-ctx", str(self.n_ctx),
               "--parent-pid", str(os.getpid())]
        # A session of its own: Ctrl-C in the terminal reaches uniil, which then stops the child itself.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        log.info("started the embedded LLM server (pid %d) for %s", self.proc.pid, self.gguf.name)
        ready = self._read_ready_line()
        self.proc.stdout.close()
        self.port = int(ready["port"])
        self.system_info = ready.get("system_info", "")
        log.info("llama.cpp system info: %s", self.system_info)
        return self.port

    def _read_ready_line(self) -> dict:
        deadline = time.monotonic() + self.start_timeout_s
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise LocalModelError(f"the embedded LLM did not start within {self.start_timeout_s:.0f} s; "
                                      f"{ELSEWHERE}")
            readable, _, _ = select.select([fd], [], [], min(left, 0.5))
            chunk = os.read(fd, 4096) if readable else b""
            if readable and not chunk:  # EOF: the child exited before it served
                self.proc.wait()
                raise LocalModelError(self._start_failure())
            buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])

    def _start_failure(self) -> str:
        code = self.proc.returncode
        if code in (EXIT_NOT_INSTALLED, EXIT_AMX_BUILD):
            return self.log_tail(1)  # the child's own one-line explanation
        tail = self.log_tail(1)
        return (f"the embedded LLM (llama.cpp) failed to load {self.gguf.name}: {describe_exit(code)}"
                + (f", '{tail}'" if tail else "") + f"; check the GGUF file, {ELSEWHERE}")

    def log_tail(self, lines: int = 1) -> str:
        if self._log is None:
            return ""
        try:
            text = Path(self._log.name).read_text(errors="replace")
        except OSError:
            return ""
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " | ".join(kept[-lines:])

    def exited(self, wait_s: float = 0.0) -> int | None:
        """The child's return code if it has ended (waiting up to wait_s for it), else None."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=wait_s) if wait_s > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def death_message(self, answered: int) -> str:
        how = describe_exit(self.proc.returncode)
        name = how[how.find("(") + 1:-1] if "(" in how else how
        hint = SIGNAL_HINTS.get(name, "see the llama.cpp log for why")
        return (f"the embedded LLM (llama.cpp server, pid {self.proc.pid}) died with {how} after {answered} "
                f"answer(s): {hint}; the answers so far are kept in the pool, rerun to continue, {ELSEWHERE}")

    def stop(self) -> None:
        """Stop the child (if it still runs) and remove its log. Safe to call twice."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None


class LocalModelError(Exception):
    """The embedded model could not start or died; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# Child side


def _exit_with_parent(parent_pid: int) -> None:
    """If uniil is killed (even with kill -9), this server must not outlive it."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def has_amx_kernels(system_info: str) -> bool:
    return "AMX_INT8 = 1" in system_info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="uniil's embedded LLM server (started by `uniil attrs build --llm local`)")
    p.add_argument("--model", required=True)
    p.add_argument("--alias", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=2048)
    a = p.parse_args(argv)
    if a.parent_pid is not None:
        _exit_with_parent(a.parent_pid)
    try:
        import llama_cpp
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        print(f"--llm local needs llama-cpp-python with its server extra ({exc}): run `make venv`, or "
              "`python -m uniil.attrpool.llama_install` (compiles once, 4-10 min), "
              f"{ELSEWHERE}", file=sys.stderr)
        return EXIT_NOT_INSTALLED
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    if has_amx_kernels(info):
        # The AMX buffer type segfaults in the first decode on some machines: refuse it before loading.
        print("the installed llama-cpp-python was compiled with llama.cpp's AMX kernels, which crash on "
              f"this kind of CPU; rebuild it without them: {REBUILD}, {ELSEWHERE}", file=sys.stderr)
        return EXIT_AMX_BUILD
    settings = ModelSettings(model=a.model, model_alias=a.alias, n_ctx=a.n_ctx, n_threads=a.threads,
                             n_threads_batch=a.threads, seed=0, verbose=False)
    app = create_app(server_settings=ServerSettings(), model_settings=[settings])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; no race with another process
    sock.listen(64)
    config = uvicorn.Config(app, log_level="info", access_log=True)  # the log file shows each request
    server = uvicorn.Server(config)
    print(json.dumps({"port": sock.getsockname()[1], "system_info": info}), flush=True)
    # From here on stdout goes to the log too: nobody reads the pipe after the ready line, and a
    # full pipe (uvicorn writes its request log to stdout) would block the server.
    os.dup2(2, 1)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
