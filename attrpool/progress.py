"""How library code reports progress without knowing about terminals: the CLI passes a rich-backed
implementation, library callers get the silent default."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
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
