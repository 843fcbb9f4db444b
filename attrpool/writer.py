"""The call log's writer: calls are journaled as they come back, and committed in batches by a thread.

A request's worker journals its call (attrpool/journal.py) and moves on: it never waits for DuckDB.
A thread of its own commits what has queued, a batch every COMMIT_EVERY_S at most: a commit costs
~3 ms of CPU (~7 on a slow machine) however few rows it holds, so fewer, larger commits are cheaper,
and as no worker waits for them, their interval costs nothing but the window a power cut could lose.
A kill -9 loses nothing journaled: the pool's next open for writing replays it. A failed commit
stops the build (the next `record` or `close` raises it); the journal keeps its calls.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from .journal import CallJournal
from .store import CallRecord, PoolStore

MAX_BATCH = 512  # rows per commit; bounds one transaction when the server outruns the disk
COMMIT_EVERY_S = 0.05  # one commit per interval at most: larger batches, less CPU


@dataclass
class _Item:
    call_id: int | None
    call: CallRecord | None
    failed: str | None  # a request key to mark failed


class PoolWriter:
    """Records calls in `store` on a thread of its own (a DuckDB connection serves one thread at a
    time, and the event loop must not wait for the disk). `record` is called from one thread."""

    def __init__(self, store: PoolStore):
        self.store = store
        store.take_call_ids(0)  # counts from the pool's calls now, before the thread shares the connection
        self.journal = CallJournal(store)
        self._error: BaseException | None = None
        self._closing = False
        self._done = threading.Event()  # set when the thread has stopped touching the connection
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pool-writer", daemon=True)
        self._thread.start()

    def record(self, call: CallRecord | None = None, *, failed: str | None = None) -> None:
        """Log `call` (an "ok" call answers its request) and/or mark request `failed`. Durable against
        a killed process when this returns; committed to the pool shortly after."""
        if self._closing:
            raise RuntimeError("the pool writer is closed")
        item = _Item(self.store.take_call_ids(1)[0] if call is not None else None, call, failed)
        self.journal.append(item.call_id, call, failed)  # first: a paid answer is kept even if the writer died
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def close(self) -> None:
        """Commit what is queued, stop the thread, and remove the journal once all of it is committed."""
        if not self._closing:
            self._closing = True
            self._queue.put(None)
        interrupted = None
        while True:
            try:
                self._done.wait()
                break
            except KeyboardInterrupt as exc:
                # Another Ctrl-C: the thread still commits on the pool's connection, and whoever
                # closes that connection next must wait for it; the interrupt is raised after.
                interrupted = exc
        self.journal.close(remove=self._error is None)
        if interrupted is not None:
            raise interrupted
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            with self.store.single_threaded():
                self._serve()
        except BaseException as exc:  # the calls stay in the journal; record() and close() raise it
            self._error = exc
        finally:
            self._done.set()

    def _serve(self) -> None:
        """Commit batch after batch until close()."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            started = time.monotonic()
            batch, stop = self._gather([first], started + COMMIT_EVERY_S)
            calls = [i for i in batch if i.call is not None]
            self.store.record_calls([i.call for i in calls], [i.failed for i in batch if i.failed is not None],
                                    ids=[i.call_id for i in calls])
            if stop:
                return

    def _gather(self, batch: list[_Item], until: float) -> tuple[list[_Item], bool]:
        """Grow `batch` with what comes before `until`; True when close() was asked for meanwhile."""
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                return batch, False
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False
