"""The call log's writer: one thread that records calls as they come back, a batch per commit.

A commit costs ~3 ms of CPU however few rows it holds (each DuckDB statement ~0.5-1 ms), so answers
are grouped: the writer takes what queued up while it was busy, then keeps the batch open while
answers keep coming (each within GAP_S of the last, LINGER_S at most), and closes it at once when
every request that could join is in it. Against a server that answers at once, the client is
CPU-bound and batches grow to the concurrency (a third of the client's CPU per answer saved,
measured); against one that takes 200 ms, answers arrive together and close the batch at once, and
a straggler waits GAP_S at most, 2.5%.

A request's coroutine awaits its record before it takes the next request: an answer is durable
before its worker moves on, so a kill -9 loses at most the answers in flight, one per worker.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from .store import CallRecord, PoolStore

MAX_BATCH = 512  # rows per commit; bounds one transaction when the server outruns the disk
GAP_S = 0.005  # a batch stays open while the next row comes within this
LINGER_S = 0.02  # and at most this long: small next to any real LLM's latency


@dataclass
class _Item:
    call: CallRecord | None
    failed: str | None  # a request key to mark failed
    future: asyncio.Future


class PoolWriter:
    """Records calls in `store` on a thread of its own (a DuckDB connection serves one thread at a
    time, and the event loop must not wait for the disk). Create it inside the running event loop."""

    def __init__(self, store: PoolStore):
        self.store = store
        # How many requests could be waiting on a record at once (the collector's live workers): a
        # batch that holds that many cannot grow, so it commits at once.
        self.writers = 1
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pool-writer", daemon=True)
        self._thread.start()

    async def record(self, call: CallRecord | None = None, *, failed: str | None = None) -> int | None:
        """Log `call` (an "ok" call answers its request) and/or mark request `failed`; returns the
        call's id once it is committed."""
        if not self._thread.is_alive():
            raise RuntimeError("the pool writer has stopped")
        item = _Item(call, failed, self._loop.create_future())
        self._queue.put(item)
        return await item.future

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        batch: list[_Item] = []
        try:
            with self.store.single_threaded():
                self._serve(batch)
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch += [item] if item is not None else []
            self._loop.call_soon_threadsafe(_settle, batch, exc)
            raise

    def _serve(self, batch: list[_Item]) -> None:
        """Commit batch after batch until close(); `batch` holds the one in hand."""
        stop = False
        while not stop:
            batch.clear()
            first = self._queue.get()
            if first is None:
                return
            batch.append(first)
            stop = self._gather(batch)
            calls = [i.call for i in batch if i.call is not None]
            try:
                ids = iter(self.store.record_calls(calls, [i.failed for i in batch if i.failed is not None]))
                outcome: list | BaseException = [next(ids) if i.call is not None else None for i in batch]
            except BaseException as exc:  # handed to every waiting request: the build stops with it
                outcome = exc
            # One wake-up of the event loop per commit, however many requests it settles.
            self._loop.call_soon_threadsafe(_settle, list(batch), outcome)

    def _gather(self, batch: list[_Item]) -> bool:
        """Grow `batch` while rows keep coming; True when close() was asked for meanwhile."""
        deadline = time.monotonic() + LINGER_S
        while len(batch) < min(MAX_BATCH, max(1, self.writers)):
            try:
                item = self._queue.get(timeout=max(0.0, min(GAP_S, deadline - time.monotonic())))
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False


def _settle(batch: list[_Item], outcome: list | BaseException) -> None:
    for n, item in enumerate(batch):
        if item.future.done():  # its request was cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome[n])
