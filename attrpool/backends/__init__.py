"""LLM backends as plugins: the interface (base.py), typed options (options.py), the registry with
its `register_backend` hook and `uniil.llm_backends` entry-point group (registry.py), and the three
built-ins: the hosted OpenAI API, any OpenAI-compatible server, and the embedded GGUF model."""

from .base import BackendArgs, FatalLLMError, LLMBackend, LLMError, RejectedLLMError, TransientLLMError
from .options import NoOptions, parse_options
from .registry import ENTRY_POINT_GROUP, backend_usages, get_backend, register_backend, unregister_backend

__all__ = ["BackendArgs", "ENTRY_POINT_GROUP", "FatalLLMError", "LLMBackend", "LLMError", "NoOptions",
           "RejectedLLMError", "TransientLLMError", "backend_usages", "get_backend", "parse_options",
           "register_backend", "unregister_backend"]
