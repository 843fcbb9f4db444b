"""Asking the LLM: one request per (source, template), answered concurrently, every attempt logged.

A request is identified by a hash of who answers it and exactly what is asked, so a rerun (or a
run after a crash) finds its answer in the pool and never pays for it twice. Transient faults
(429, 5xx, timeouts) are retried with exponential backoff that honours Retry-After; answers with
no usable phrase are asked again at a higher temperature; a request that still has nothing is
marked failed and reported by source.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

from ..common import NullProgress, Progress
from ..prompts.templates import answer_schema
from .llm import ChatBackend, FatalLLMError, LLMSpec, RejectedLLMError, TransientLLMError
from .normalize import normalize_phrase, usable_phrase
from .parse import parse_attributes
from .plan import AttributeRequest, plan_requests  # noqa: F401  (plan_requests: its home before plan.py)
from .store import CallRecord, PoolStore
from .writer import PoolWriter

log = logging.getLogger(__name__)


def usable_phrases(text: str, source_name: str) -> list[str]:
    return [p for p in parse_attributes(text) if usable_phrase(normalize_phrase(p), source_name)]


@dataclass
class RetryPolicy:
    attempts: int = 4  # tries per request, transient faults and unusable answers alike
    base_s: float = 0.5  # first backoff; doubles each retry (with jitter), capped at max_s
    max_s: float = 30.0
    max_retry_after_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_s, self.base_s * 2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after_s))
        return backoff


@dataclass
class CollectResult:
    answered: int = 0
    failed: int = 0
    unasked: int = 0  # left for the next run by the --max-requests budget
    http_requests: int = 0
    failed_sources: dict[str, int] = field(default_factory=dict)


class Collector:
    def __init__(self, backend: ChatBackend, store: PoolStore, spec: LLMSpec, *, concurrency: int = 4,
                 max_requests: int | None = None, retry: RetryPolicy | None = None,
                 max_tokens: int = 160, progress: Progress | None = None):
        self.backend, self.store, self.spec = backend, store, spec
        self.concurrency = max(1, concurrency)
        self.max_requests = max_requests
        self.retry = retry or RetryPolicy()
        self.max_tokens = max_tokens
        self.progress = progress or NullProgress()
        self.result = CollectResult()
        self._writer: PoolWriter | None = None

    def _budget_left(self) -> bool:
        return self.max_requests is None or self.result.http_requests < self.max_requests

    async def run(self, requests: list[AttributeRequest]) -> CollectResult:
        queue: asyncio.Queue[AttributeRequest] = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        self.progress.start("requests", "asking the LLM", len(requests))
        self._writer = PoolWriter(self.store)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(min(self.concurrency, len(requests)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            try:
                self._writer.close()  # commits what is queued: an interrupted build keeps every answer it got
            finally:
                self.progress.stop("requests")
        return self.result

    async def _worker(self, queue: asyncio.Queue) -> None:
        while not queue.empty():
            req = queue.get_nowait()
            status = await self._ask(req)
            if status == "answered":
                self.result.answered += 1
            elif status == "failed":
                self.result.failed += 1
                self.result.failed_sources[req.source_name] = self.result.failed_sources.get(req.source_name, 0) + 1
            else:
                self.result.unasked += 1
            self.progress.advance("requests")

    def _record(self, req: AttributeRequest, attempt: int, status: str, **kw) -> CallRecord:
        backend = self.spec.backend
        return CallRecord(req.key, backend.name, backend.logged_base_url, self.spec.model, req.template,
                          req.form, req.prompt_hash, kw.pop("structured", None), attempt, status, **kw)

    async def _ask(self, req: AttributeRequest) -> str:
        connection_only = True
        unusable = 0  # answers without a usable phrase so far: only these call for other sampling
        for attempt in range(self.retry.attempts):
            if not self._budget_left():
                return "unasked"
            self.result.http_requests += 1
            try:
                c = await self.backend.complete(
                    form=req.form, messages=req.payload.get("messages"), prompt=req.payload.get("prompt"),
                    schema=answer_schema(req.n), max_tokens=self.max_tokens,
                    temperature=0.8 if unusable else 0.0, seed=unusable)
            except TransientLLMError as exc:
                self._writer.record(self._record(req, attempt, "error", error=str(exc)[:500]))
                connection_only &= exc.connection
                if attempt + 1 < self.retry.attempts:
                    await asyncio.sleep(self.retry.delay(attempt, exc.retry_after))
                continue
            except RejectedLLMError as exc:
                self._writer.record(self._record(req, attempt, "error", error=str(exc)[:500]))
                connection_only = False
                break
            connection_only = False
            rec = self._record(req, attempt, "ok", structured=c.structured, response=c.text,
                               latency_s=c.latency_s, prompt_tokens=c.prompt_tokens,
                               completion_tokens=c.completion_tokens)
            if usable_phrases(c.text, req.source_name):
                self._writer.record(rec)
                return "answered"
            rec.status = "unusable"
            unusable += 1
            self._writer.record(rec)
            log.info("no usable attribute in the answer for %s (%s), attempt %d", req.source_name, req.template, attempt + 1)
        if connection_only:
            raise FatalLLMError(f"cannot reach the LLM server at {self.spec.base_url} after "
                                f"{self.retry.attempts} tries; start it or check --llm-url")
        self._writer.record(failed=req.key)
        return "failed"
