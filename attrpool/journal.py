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

from ..errors import UserError
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
        data = memoryview((json.dumps(entry, ensure_ascii=False) + "\n").encode())
        while data:  # a regular file takes it whole, but write() may in principle take less
            data = data[os.write(self._fd, data):]

    def close(self, *, remove: bool) -> None:
        """Close the file; with remove, delete it (every call in it is committed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            self.path.unlink(missing_ok=True)


def replay(store: PoolStore) -> int:
    """Commit the calls of `store`'s journal that the pool lacks, then remove the journal; returns
    how many calls were added. A journal that belongs to another pool is set aside, not replayed;
    a call the pool refuses is set aside in `<journal>.rejected-*`, the others are kept."""
    path = journal_path(store.path)
    if not path.exists():
        return 0
    entries = _read(path)
    if not entries:  # killed before its header was written: it holds nothing
        path.unlink()
        return 0
    header = entries[0]
    if header.get("journal") != FORMAT or header.get("pool_id") != store.pool_id():
        aside = _set_aside(path, "orphan")
        log.warning("%s does not belong to pool %s; set aside as %s", path.name, store.path.name, aside.name)
        return 0
    calls = [e for e in entries[1:] if e.get("call") is not None]
    known = store.known_call_ids([e["id"] for e in calls])
    new = [e for e in calls if e["id"] not in known]
    failed = [e["failed"] for e in entries[1:] if e.get("failed") is not None]
    try:
        _commit(store, new, failed)
    except Exception:  # one refused call must not cost the others: commit them one by one
        kept, refused = [], []
        for e in new:
            try:
                _commit(store, [e], [])
                kept.append(e)
            except Exception as exc:
                refused.append(e | {"refused": str(exc).splitlines()[0]})
        _commit(store, [], failed)
        if refused:
            aside = _set_aside(path, "rejected", refused)
            log.warning("pool %s refused %d call(s) of %s; they are in %s", store.path.name, len(refused),
                        path.name, aside.name)
        new = kept
    store.recount_call_ids()
    path.unlink(missing_ok=True)
    if new or failed:
        log.info("%s: replayed %d call(s) the pool lacked", path.name, len(new))
    return len(new)


def _read(path: Path) -> list[dict]:
    """The journal's entries; only its last line may be cut short (by a kill mid-write)."""
    lines = path.read_bytes().split(b"\n")
    entries = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:  # no newline after it: the write was never finished, nor acknowledged
                log.warning("%s: ignoring its last line, cut short", path.name)
                continue
            entry = None
        if not isinstance(entry, dict):
            raise UserError(f"{path.name} is damaged (line {n + 1} is not a journal entry); move it elsewhere "
                            f"to open pool {path.name.removesuffix('.journal')} without its calls")
        entries.append(entry)
    return entries


def _commit(store: PoolStore, entries: list[dict], failed: list[str]) -> None:
    store.record_calls([CallRecord(**e["call"]) for e in entries], failed, ids=[e["id"] for e in entries])


def _set_aside(path: Path, why: str, entries: list[dict] | None = None) -> Path:
    """Move the journal (or write `entries`) to `<journal>.<why>-<ns>`, never over another file."""
    aside = path.with_name(f"{path.name}.{why}-{time.time_ns()}")
    if entries is None:
        os.replace(path, aside)
    else:
        aside.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return aside
