"""`--llm-url URL --llm-model MODEL` (short for `--llm server:URL`): any OpenAI-compatible server,
such as vLLM or llama.cpp's. A key is sent only if --api-key-env names one."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx2

from ...errors import UserError
from ...typed_options import opt
from .base import BackendArgs, LLMBackend


@dataclass(frozen=True)
class ServerOptions:
    verify_tls: bool = opt(True, "check the server's TLS certificate (false: accept an in-house self-signed one)")


@dataclass(frozen=True)
class ServerBackend(LLMBackend):
    name = "server"
    usage = "--llm-url URL --llm-model MODEL"
    Options = ServerOptions

    options: ServerOptions = field(default_factory=ServerOptions)

    @classmethod
    def parse(cls, arg: str | None, args: BackendArgs) -> "ServerBackend":
        if not arg:
            raise UserError("--llm server needs the server's URL: --llm-url URL --llm-model MODEL")
        if not args.model:
            raise UserError("--llm-url needs --llm-model NAME (the model the server serves)")
        return cls(args.model, arg.rstrip("/"), args.api_key_env, args.options)

    def transport(self) -> httpx2.AsyncBaseTransport | None:
        return None if self.options.verify_tls else httpx2.AsyncHTTPTransport(verify=False)
