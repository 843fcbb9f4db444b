"""Which continual-learning methods exist: every module of this package is imported (a file dropped
into trainer/methods/ needs no other edit), then every entry point of the group `uniil.methods`
(an installed package adds methods without touching this one). Importing a module runs its
`@register_method("name")` decorators; an entry point may also name a ContinualMethod class."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import types
from importlib import metadata
from typing import TYPE_CHECKING

from ...errors import UserError

if TYPE_CHECKING:
    from .base import ContinualMethod

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "uniil.methods"
METHODS: dict[str, type[ContinualMethod]] = {}


def register_method(name: str):
    """Class decorator: the method is known as `name` (`uniil train --method name`)."""
    def wrap(cls):
        from .base import ContinualMethod
        from ...typed_options import check_presets, option_specs

        if not (isinstance(cls, type) and issubclass(cls, ContinualMethod)):
            raise TypeError(f"@register_method({name!r}) decorates {cls!r}, not a ContinualMethod subclass")
        old = METHODS.get(name)
        # The same class imported again (a reloaded module) replaces itself; another class may not.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"method name '{name}' is taken by {old.__module__}.{old.__qualname__}")
        option_specs(cls.Options, cls.presets)  # a bad declaration fails when the method is defined
        check_presets(name, cls.Options, cls.presets)
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


def discover() -> None:
    """Import this package's modules and load the `uniil.methods` entry points (cheap when repeated:
    imported modules are cached)."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = f"{package.__name__}.{info.name}"
        try:
            importlib.import_module(module)
        except UserError:
            raise
        except Exception as exc:  # a broken method file: say which, the traceback goes to the log
            log.debug("importing %s failed", module, exc_info=True)
            folder = getattr(info.module_finder, "path", package.__name__)
            raise UserError(f"method module {info.name} (in {folder}) cannot be "
                            f"imported: {exc.__class__.__name__}: {_first_line(exc)}; fix or remove it") from None
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(entry)


def _load_entry_point(entry) -> None:
    from .base import ContinualMethod

    where = f"method plugin '{entry.name}' ({entry.value}"
    dist = getattr(entry, "dist", None)
    where += f", from {dist.name})" if dist is not None and getattr(dist, "name", None) else ")"
    try:
        loaded = entry.load()
    except Exception as exc:
        log.debug("loading %s failed", where, exc_info=True)
        raise UserError(f"{where} cannot be loaded: {exc.__class__.__name__}: {_first_line(exc)}; "
                        "fix or uninstall the package that provides it") from None
    if isinstance(loaded, type) and issubclass(loaded, ContinualMethod):
        if METHODS.get(loaded.__dict__.get("name") or entry.name) is not loaded:
            try:
                # A subclass of a registered method inherits its `name`: only its own counts.
                register_method(loaded.__dict__.get("name") or entry.name)(loaded)
            except TypeError as exc:
                raise UserError(f"{where}: {exc}") from None
    elif not isinstance(loaded, types.ModuleType):
        raise UserError(f"{where} is neither a module nor a ContinualMethod class; point it at one")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def known_methods() -> list[str]:
    discover()
    return sorted(METHODS)


def method_class(name: str) -> type[ContinualMethod]:
    if name not in METHODS:  # a name already registered needs no scan of the folder and the plugins
        known = known_methods()
        if name not in METHODS:
            raise UserError(f"unknown method '{name}'; known: {', '.join(known)} (uniil methods describes them)")
    return METHODS[name]
