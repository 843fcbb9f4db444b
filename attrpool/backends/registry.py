"""Which LLM backends exist: the built-in ones, those registered in this process with
`register_backend`, and those installed packages declare in the `uniil.llm_backends` entry-point
group (`NAME = package.module:BackendClass`).

An entry point is loaded only when `--llm NAME` asks for it, so a broken plugin breaks only the
builds that use it, and every other build starts no faster or slower for it being installed.
"""

from __future__ import annotations

import importlib.metadata
import logging

from ...errors import UserError
from .base import LLMBackend

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "uniil.llm_backends"

_backends: dict[str, type[LLMBackend]] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    # Imported on first use, not at import time: the built-ins import the openai stack's transports.
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from .local import LocalBackend
    from .openai_api import OpenAIBackend
    from .server import ServerBackend

    for cls in (LocalBackend, OpenAIBackend, ServerBackend):  # the order `unknown --llm` lists them in
        _backends.setdefault(cls.name, cls)


def register_backend(cls: type[LLMBackend] | None = None, *, replace: bool = False):
    """Make `--llm NAME[:ARG]` reach an LLMBackend subclass. Usable as a class decorator.
    A name already taken is refused unless replace=True."""
    def register(backend: type[LLMBackend]) -> type[LLMBackend]:
        if not (isinstance(backend, type) and issubclass(backend, LLMBackend)):
            raise TypeError(f"{backend!r} is not an LLMBackend subclass")
        name = getattr(backend, "name", "")
        if not name or ":" in name:
            raise ValueError(f"{backend.__name__}.name must be a non-empty name without ':'")
        _load_builtins()
        taken = _backends.get(name)
        if taken is not None and taken is not backend and not replace:
            raise ValueError(f"LLM backend '{name}' is already registered ({taken.__module__}.{taken.__qualname__})")
        _backends[name] = backend
        return backend

    return register if cls is None else register(cls)


def unregister_backend(name: str) -> None:
    _backends.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> type[LLMBackend]:
    where = f"LLM backend plugin '{ep.name}' ({ep.value}" + (f", from {ep.dist.name}" if ep.dist else "") + ")"
    try:
        cls = ep.load()
    except Exception as exc:  # a plugin's own bug: one line that names it, not our traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{where} failed to load: {type(exc).__name__}: {first}") from None
    if not (isinstance(cls, type) and issubclass(cls, LLMBackend)):
        raise UserError(f"{where} is not an LLMBackend subclass")
    if getattr(cls, "name", None) != ep.name:
        raise UserError(f"{where} is a backend named '{getattr(cls, 'name', None)}', not '{ep.name}'")
    log.info("loaded %s", where)
    if _backends.get(ep.name) is not cls:  # unless its module registered it already, with the decorator
        register_backend(cls)
    return cls


def get_backend(name: str) -> type[LLMBackend] | None:
    """The backend class registered (or installed) as `name`, or None."""
    _load_builtins()
    if name in _backends:
        return _backends[name]
    ep = _entry_points().get(name)
    return _load_entry_point(ep) if ep is not None else None


def backend_usages() -> list[str]:
    """How `--llm` can be spelled, every backend (installed plugins unloaded) included."""
    _load_builtins()
    usages = [cls.usage_text() for cls in _backends.values()]
    return usages + [f"{name}:..." for name in _entry_points() if name not in _backends]
