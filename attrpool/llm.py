"""Asking an LLM: which one (LLMSpec, built from the command line) and the one client that every
backend's requests go through (ChatBackend, speaking OpenAI chat/completions over the openai SDK's
HTTP client).

Who answers and how requests reach them is a backend's business (backends/: the hosted OpenAI API,
any OpenAI-compatible server, the embedded GGUF model, and installed plugins).

Structured output differs by server: OpenAI and vLLM take `response_format` json_schema,
llama.cpp's servers want `{"type": "json_object", "schema": S}`, some take neither. The client
starts from the remembered (or given) mode and steps down when a server rejects one.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx2  # the HTTP library of openai>=3

from ..errors import UserError
from .backends import (BackendArgs, FatalLLMError, LLMBackend, LLMError, RejectedLLMError, TransientLLMError,
                       backend_usages, get_backend, parse_options)
from .backends.local import default_gguf  # re-exported: its home before backends existed

log = logging.getLogger(__name__)

STRUCTURED_MODES = ("json_schema", "json_object", "none")
DEFAULT_BACKEND = "local"  # offline out of the box
URL_BACKEND = "server"  # `--llm-url URL` is short for `--llm server:URL`

__all__ = ["ChatBackend", "Completion", "FatalLLMError", "LLMError", "LLMSpec", "RejectedLLMError",
           "TransientLLMError", "answer_text", "default_gguf", "request_body"]


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", or " + items[-1]


@dataclass(frozen=True)
class LLMSpec:
    """Which LLM a build asks (its backend) and in which structured-output mode."""

    backend: LLMBackend
    structured: str = "auto"

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def base_url(self) -> str:
        return self.backend.base_url

    @property
    def api_key_env(self) -> str | None:
        return self.backend.api_key_env

    @property
    def identity(self) -> str:
        """Who answers: part of every request key, so answers are reused only for the same model."""
        return self.backend.identity

    @property
    def default_form(self) -> str:
        return self.backend.default_form

    @classmethod
    def from_options(cls, llm: str | None, url: str | None, model: str | None,
                     api_key_env: str | None, structured: str = "auto",
                     options: Sequence[str] | None = None) -> "LLMSpec":
        """From the command line: `--llm NAME[:ARG]` or `--llm-url URL --llm-model MODEL`, and
        `--llm-option KEY=VALUE` strings for the chosen backend's typed options."""
        if structured not in ("auto", *STRUCTURED_MODES):
            raise UserError(f"unknown --structured '{structured}'; use auto, {', '.join(STRUCTURED_MODES)}")
        if url:
            if llm is not None:
                raise UserError("give either --llm or --llm-url, not both")
            name, arg = URL_BACKEND, url
        else:
            name, sep, arg = (llm or DEFAULT_BACKEND).partition(":")
            arg = arg if sep else None
        backend_cls = get_backend(name)
        if backend_cls is None:
            raise UserError(f"unknown --llm '{llm}'; use {_or_list(backend_usages())}")
        typed = parse_options(backend_cls.Options, options or (), name)
        return cls(backend_cls.parse(arg, BackendArgs(model, api_key_env, typed)), structured)


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
    """The client of every backend: JSON POSTs over the openai SDK's httpx client, or over the
    backend's transport.

    Requests skip the SDK's request machinery (options copies, header merging, auth hooks, response
    casting): at hundreds of answers a second that was a third of the client's CPU per request. What
    goes over the wire (URL, JSON body, bearer key, timeout, connection limits) and how failures are
    classified are the SDK's.
    """

    def __init__(self, spec: LLMSpec, structured: str | None = None, timeout_s: float = 120.0):
        import openai

        self.spec = spec
        self.structured = structured if structured in STRUCTURED_MODES else (
            spec.structured if spec.structured in STRUCTURED_MODES else "json_schema")
        key = spec.backend.api_key()  # a missing key fails here, before the build writes anything
        self.timeout_s = timeout_s
        self._http = openai.DefaultAsyncHttpxClient(transport=spec.backend.transport(), timeout=timeout_s)
        base = spec.base_url.rstrip("/")
        self._urls = {"chat": f"{base}/chat/completions", "completion": f"{base}/completions"}
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "Authorization": f"Bearer {key or 'not-needed'}"}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, *, form: str, messages: list[dict] | None, prompt: str | None,
                       schema: dict, max_tokens: int, temperature: float, seed: int) -> Completion:
        while True:
            mode = self.structured if form == "chat" else None
            start = time.perf_counter()
            body = request_body(self.spec.model, form, messages, prompt, schema, max_tokens,
                                temperature, seed, mode)
            try:
                r = await self._http.post(self._urls[form], content=json.dumps(body).encode(), headers=self._headers)
            except httpx2.TimeoutException:
                raise TransientLLMError(f"timed out after {self.timeout_s}s") from None
            except httpx2.TransportError as exc:
                raise TransientLLMError(f"cannot connect to {self.spec.base_url}: {exc}", connection=True) from None
            except httpx2.RequestError as exc:  # e.g. a body that cannot be decoded: as the SDK, a transient error
                raise TransientLLMError(f"request to {self.spec.base_url} failed: {exc}") from None
            if r.status_code >= 400:
                message = _status_message(r)
                if mode not in (None, "none") and r.status_code in (400, 422, 500) and _rejects_structured(message):
                    self._step_down(mode, message)
                    continue
                raise self._classify(r.status_code, message, r.headers)
            try:
                answer = json.loads(r.content)
            except ValueError:
                raise TransientLLMError(f"HTTP {r.status_code} with a body that is not JSON: {r.text[:200]}") from None
            usage = (answer.get("usage") if isinstance(answer, dict) else None) or {}
            usage = usage if isinstance(usage, dict) else {}
            return Completion(answer_text(answer), time.perf_counter() - start,
                              _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")),
                              mode)

    def _step_down(self, mode: str, message: str) -> None:
        if self.structured == mode:  # concurrent requests may have stepped down already
            self.structured = STRUCTURED_MODES[STRUCTURED_MODES.index(mode) + 1]
            log.info("server rejected response_format %s (%s); using %s", mode, message[:120], self.structured)

    def _classify(self, status: int, message: str, headers) -> LLMError:
        body = message[:300]
        if status in (401, 403):
            hint = f"check ${self.spec.api_key_env}" if self.spec.api_key_env else "pass --api-key-env VAR"
            return FatalLLMError(f"the server at {self.spec.base_url} refused the API key (HTTP {status}); {hint}")
        if status == 404:
            return FatalLLMError(f"model '{self.spec.model}' not found at {self.spec.base_url} (HTTP 404); "
                                 "check --llm-model / --llm openai:MODEL")
        if status == 429 or status >= 500 or status == 408:
            return TransientLLMError(f"HTTP {status}: {body}", parse_retry_after(headers))
        return RejectedLLMError(f"HTTP {status}: {body}")


def _token_count(value) -> int | None:
    """A server's token count as the pool stores it (INTEGER): anything else is recorded as unknown."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return int(value) if 0 <= value < 2 ** 31 else None


def _status_message(response: httpx2.Response) -> str:
    """What the SDK says of an error response: `Error code: N - <error.message>`."""
    message = f"Error code: {response.status_code}"
    try:
        error = json.loads(response.content)
    except ValueError:
        return f"{message} - {response.text.strip()}" if response.text.strip() else message
    inner = error.get("error", error) if isinstance(error, dict) else None
    text = inner.get("message") if isinstance(inner, dict) else None
    if isinstance(text, str) and text:
        return f"{message} - {text}"
    # Servers that answer {"error": "..."} or {"detail": "..."}: the whole body, as the SDK formats it,
    # so that a rejected response_format is still recognised.
    return f"{message} - {response.text.strip()}" if response.text.strip() else message


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
    choice = choices[0] if isinstance(choices, list) else None
    if not isinstance(choice, dict):
        return ""
    text = choice["message"].get("content") if isinstance(choice.get("message"), dict) else choice.get("text")
    if isinstance(text, list):  # content as parts: [{"type": "text", "text": ...}, ...]
        text = "".join(part.get("text") or "" for part in text if isinstance(part, dict))
    return text if isinstance(text, str) else ""
