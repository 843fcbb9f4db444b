"""`--llm openai:MODEL`: the hosted OpenAI API. The key comes from an environment variable
($OPENAI_API_KEY, or the one --api-key-env names) and is never stored or logged."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import UserError
from .base import BackendArgs, LLMBackend


@dataclass(frozen=True)
class OpenAIBackend(LLMBackend):
    name = "openai"
    usage = "openai:MODEL"
    key_required = True

    @classmethod
    def parse(cls, arg: str | None, args: BackendArgs) -> "OpenAIBackend":
        if not arg:
            raise UserError("--llm openai needs a model: --llm openai:MODEL, e.g. openai:gpt-4o-mini")
        # OPENAI_BASE_URL: the same variable the openai SDK reads (a proxy or an Azure-style gateway).
        return cls(arg, os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   args.api_key_env or "OPENAI_API_KEY")
