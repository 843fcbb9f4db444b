"""The interface an LLM backend implements, and the errors its requests end in.

Every backend speaks OpenAI chat/completions over HTTP through the same client (llm.ChatBackend),
so a backend only says who answers and how requests reach them: the model name sent in each body,
the base URL, the API key's environment variable, and optionally an httpx transport that carries
the requests (the embedded model's transport starts its server process on the first request).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import httpx2  # the HTTP library of openai>=3

from ...errors import UserError
from .options import NoOptions


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
    """No request can succeed (bad key, unknown model, a dead model process): the whole build stops.
    A transport raises it to end the build with its message as the one line the user sees."""


@dataclass(frozen=True)
class BackendArgs:
    """What the command line says about the LLM besides `--llm NAME[:ARG]`."""

    model: str | None = None  # --llm-model
    api_key_env: str | None = None  # --api-key-env
    options: object = NoOptions()  # the backend's own Options dataclass, parsed from --llm-option


@dataclass(frozen=True)
class LLMBackend(ABC):
    """One way to reach an LLM. A subclass is a frozen dataclass of its parsed configuration,
    registered under `name` with registry.register_backend (or the `uniil.llm_backends` entry-point
    group), and claims `--llm NAME` and `--llm NAME:ARG`."""

    name: ClassVar[str]  # also the call log's `backend` column
    usage: ClassVar[str] = ""  # how --llm spells it, for the "unknown --llm" message; default NAME:...
    Options: ClassVar[type] = NoOptions  # typed --llm-option keys; any other key is refused
    default_form: ClassVar[str] = "chat"  # prompt form when --form is not given: "chat" or "completion"
    key_required: ClassVar[bool] = False  # a hosted API: no key, no build

    model: str  # the "model" of every request body
    base_url: str  # where the client sends requests (a transport may redirect them)
    api_key_env: str | None = None  # the environment variable holding the key (never stored)

    @classmethod
    @abstractmethod
    def parse(cls, arg: str | None, args: BackendArgs) -> "LLMBackend":
        """The backend for `--llm NAME:ARG` (arg None for a bare `--llm NAME`); UserError if unusable."""

    @property
    def identity(self) -> str:
        """Who answers: part of every request key, so a pool reuses answers only from the same model.
        Changing it for an existing backend would make every pool ask again, so it never changes."""
        return self.model

    @property
    def logged_base_url(self) -> str | None:
        """The call log's `base_url` column."""
        return self.base_url

    def api_key(self) -> str | None:
        """The key, read from the environment when the client starts."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key and self.key_required:
            raise UserError(f"no API key: set the environment variable {self.api_key_env} "
                            "(or name another one with --api-key-env)")
        return key

    def transport(self) -> httpx2.AsyncBaseTransport | None:
        """What carries the requests; None: the openai SDK's default HTTP transport. Closed with the client."""
        return None

    @classmethod
    def usage_text(cls) -> str:
        return cls.usage or f"{cls.name}:..."
