"""What every layer shares and none owns: the cache directory, atomic file writes, progress.

It imports nothing of uniil, so cli, trainer, attrpool, backbones and data can all use it
without an import running upward.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

CACHE_ENV = "UNIIL_CACHE_DIR"


def usable_cpus() -> int:
    """CPUs this process may run on (taskset, cgroup cpusets), which can be fewer than the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cache_dir() -> Path:
    """Where cached features, matches and trained built-in backbones live ($UNIIL_CACHE_DIR wins)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("uniil"))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it replaces `path` in one rename, so
    readers (other processes, DDP ranks, a rerun after a crash) never see half a file. On failure
    the temporary file is removed and `path` is left as it was. The suffix is kept, since some
    writers (numpy's savez) append one when it is missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class Progress(Protocol):
    """How library code reports progress without knowing about terminals: the CLI passes a
    rich-backed implementation, library callers get the silent default."""

    def start(self, task: str, description: str, total: int | None) -> None: ...

    def advance(self, task: str, n: int = 1) -> None: ...

    def stop(self, task: str) -> None: ...


class NullProgress:
    def start(self, task: str, description: str, total: int | None) -> None:
        pass

    def advance(self, task: str, n: int = 1) -> None:
        pass

    def stop(self, task: str) -> None:
        pass
