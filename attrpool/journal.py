"""The call journal: every LLM call, appended to a file beside the pool before DuckDB commits it.

A request's worker writes its call here (one `write` to an append-only file: ~20 µs) and moves on
at once; the pool writer commits calls to DuckDB in batches behind it. The operating system keeps
what was written even if the process is killed (kill -9, an OOM kill, a crash), so an answer is
never lost and never paid for twice, yet no worker waits for a commit: against a server that
answers in 200 ms, workers that waited for the same batched commit ran in lock-step rounds, each
paying every other worker's client CPU (1.47x ideal on a slow 2-core machine). A machine that
loses power may lose the calls of the last commit interval (~50 ms), as the file is not fsynced.

The next open of the pool for writing replays the calls the pool lacks (their ids say which) and
removes the journal; a clean close of the writer removes it too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import CallRecord, PoolStore

log = logging.getLogger(__name__)

FORMAT = 1


def journal_path(work_file: Path) -> Path:
    return work_file.with_name(work_file.name + ".journal")


class CallJournal:
    """Appends calls for the pool `store`; used by one thread (the event loop's)."""

    def __init__(self, store: PoolStore):
        self.path = journal_path(store.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size == 0:
            self._write({"journal": FORMAT, "pool_id": store.pool_id()})

    def append(self, call_id: int | None, call: CallRecord | None, failed: str | None) -> None:
        # vars(), not dataclasses.asdict: asdict deep-copies every field (0.1 ms a call, measured).
        self._write({"id": call_id, "call": vars(call) if call is not None else None, "failed": failed})

    def _write(self, entry: dict) -> None:
        os.write(self._fd, (json.dumps(entry, ensure_ascii=False) + "\n").encode())

    def close(self, *, remove: bool) -> None:
        """Close the file; with remove, delete it (every call in it is committed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            self.path.unlink(missing_ok=True)


def replay(store: PoolStore) -> int:
    """Commit the calls of `store`'s journal that the pool lacks, then remove the journal; returns
    how many calls were added. A journal that belongs to another pool is set aside, not replayed."""
    from .store import CallRecord

    path = journal_path(store.path)
    if not path.exists():
        return 0
    lines = path.read_bytes().split(b"\n")
    entries = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            if n >= len(lines) - 2:  # the last line, cut short by a crash mid-write: never acknowledged
                log.warning("%s: ignoring its last line, cut short", path.name)
                continue
            raise
    header = entries[0] if entries else {}
    if header.get("journal") != FORMAT or header.get("pool_id") != store.pool_id():
        aside = path.with_name(f"{path.name}.orphan-{int(time.time())}")
        os.replace(path, aside)
        log.warning("%s does not belong to pool %s; set aside as %s", path.name, store.path.name, aside.name)
        return 0
    calls = [e for e in entries[1:] if e.get("call") is not None]
    known = store.known_call_ids([e["id"] for e in calls])
    new = [e for e in calls if e["id"] not in known]
    failed = [e["failed"] for e in entries[1:] if e.get("failed") is not None]
    try:
        store.record_calls([CallRecord(**e["call"]) for e in new], failed, ids=[e["id"] for e in new])
        store.recount_call_ids()
    except Exception as exc:
        from ..errors import UserError

        raise UserError(f"cannot replay {path.name} into pool {store.path.name} ({str(exc).splitlines()[0]}); "
                        f"move {path.name} elsewhere to open the pool without its {len(new)} call(s)") from None
    path.unlink()
    if new or failed:
        log.info("%s: replayed %d call(s) the pool lacked", path.name, len(new))
    return len(new)
