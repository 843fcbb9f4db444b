"""`uniil attrs build` and `uniil attrs ingest`: the attribute pool's pipeline, start to end.

Checks that can fail on user input (names, templates, API key, backbone of an existing pool) run
before anything is written, so bad input never leaves a file behind.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones.spec import BackboneSpec
from ..common import NullProgress, Progress
from ..data.registry import NameSet
from ..errors import UserError
from ..prompts.templates import load_templates
from .collect import Collector, RetryPolicy, usable_phrases
from .journal import journal_path
from .llm import ChatBackend, FatalLLMError, LLMSpec
from .plan import AttributeRequest, derivation_settings, plan_fingerprint, plan_requests, planned_count
from .store import CallRecord, PoolStore, partial_path

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    pool: Path
    names: NameSet
    llm: LLMSpec
    backbone: BackboneSpec
    templates: list[str] | None = None
    per_class: int = 8
    concurrency: int = 4
    max_requests: int | None = None
    dedupe_threshold: float = 0.9
    form: str | None = None  # "chat" or "completion"; default: the backend's
    batch_file: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_tokens: int = 160
    timeout_s: float = 120.0
    device: str = "cpu"


@dataclass
class BuildReport:
    pool: Path
    planned: int = 0
    reused: int = 0
    answered: int = 0
    failed: int = 0
    http_requests: int = 0
    failed_sources: dict[str, int] = field(default_factory=dict)
    rebuilt: bool = False
    batch_written: int | None = None
    stats: dict = field(default_factory=dict)


def _existing_work_file(pool: Path) -> Path | None:
    for p in (pool, partial_path(pool)):
        if p.exists():
            return p
    return None


def _pending(pool: Path, requests: list[AttributeRequest], backbone: BackboneSpec) -> list[AttributeRequest]:
    """What this build still has to ask, read without writing (and the backbone check, early)."""
    if _existing_work_file(pool) is None:
        return requests
    with PoolStore.open_for_read(pool, allow_partial=True) as store:
        store.check_backbone(backbone.id, backbone.cli_options())
        done = store.answered_keys([r.key for r in requests])
    return [r for r in requests if r.key not in done]


def _validate(cfg: BuildConfig) -> None:
    if not 0.0 < cfg.dedupe_threshold <= 1.0:
        raise UserError(f"--dedupe-threshold {cfg.dedupe_threshold} is outside (0, 1]; 0.9 merges near-duplicates")
    if cfg.per_class < 1 or cfg.concurrency < 1:
        raise UserError("--per-class and --concurrency must be at least 1")
    if cfg.max_requests is not None and cfg.max_requests < 0:
        raise UserError("--max-requests must be 0 or more")
    if cfg.form not in (None, "chat", "completion"):
        raise UserError(f"unknown --form '{cfg.form}'; use chat or completion")
    if not cfg.names.classes and not cfg.names.domains:
        raise UserError(f"dataset {cfg.names.dataset} has no classes or domains to ask about")


def _finished_rerun(cfg: BuildConfig, templates, fingerprint: str) -> BuildReport | None:
    """The report of a rerun that has nothing to ask and nothing to derive, read from the finished
    pool without planning a single request; None when there is work to do."""
    if not cfg.pool.exists() or cfg.batch_file is not None:
        return None
    with PoolStore.open_for_read(cfg.pool) as store:
        store.check_backbone(cfg.backbone.id, cfg.backbone.cli_options())
        if not store.plan_is_done(fingerprint):
            return None
        planned = planned_count(cfg.names, templates)
        return BuildReport(cfg.pool, planned=planned, reused=planned, stats=store.stats())


def build_pool(cfg: BuildConfig, progress: Progress | None = None) -> BuildReport:
    progress = progress or NullProgress()
    _validate(cfg)
    PoolStore.recover(cfg.pool)  # a killed build's journaled answers count as answered below
    templates = load_templates(cfg.templates)
    form = cfg.form or cfg.llm.default_form
    fingerprint = plan_fingerprint(cfg.names, templates, cfg.per_class, form, cfg.llm.identity,
                                   derivation_settings(cfg.dedupe_threshold, cfg.backbone.id))
    finished = _finished_rerun(cfg, templates, fingerprint)
    if finished is not None:
        return finished
    requests = plan_requests(cfg.names, templates, cfg.per_class, form, cfg.llm.identity)
    if not requests:
        raise UserError(f"nothing to ask: dataset {cfg.names.dataset} has no sources for templates "
                        f"{', '.join(t.name for t in templates)}")
    pending = _pending(cfg.pool, requests, cfg.backbone)
    report = BuildReport(cfg.pool, planned=len(requests), reused=len(requests) - len(pending))
    backend = None
    if pending and cfg.batch_file is None:
        backend = ChatBackend(cfg.llm, timeout_s=cfg.timeout_s)  # fails on a missing API key, before any write

    created = _existing_work_file(cfg.pool) is None
    store = PoolStore.open_for_write(cfg.pool)
    outcome = "failed"
    try:
        store.check_backbone(cfg.backbone.id, cfg.backbone.cli_options())
        store.set_meta("backbone_model", cfg.backbone.model)
        store.set_meta("backbone_pretrained", cfg.backbone.pretrained or "")
        store.add_requests([r.row() for r in pending])  # answered ones are in the pool already
        if cfg.batch_file is not None:
            _add_sources(store, cfg.names)
            from .batchfile import write_batch_file
            mode = cfg.llm.structured if cfg.llm.structured != "auto" else "json_schema"
            report.batch_written = write_batch_file(cfg.batch_file, pending, cfg.llm, cfg.max_tokens, mode)
            outcome = "keep"  # the pool is finished by `attrs ingest`
            return report
        if pending:
            _collect(cfg, store, backend, pending, report, progress)
        _finish_derivation(store, cfg.backbone, cfg.dedupe_threshold, cfg.device, progress, report, cfg.names)
        if not report.failed:  # a failed prompt is asked again by the next run: that one has work
            store.mark_plan_done(fingerprint)
        outcome = "finish"
    finally:
        _close(store, cfg.pool, outcome, created=created)
    return report


def _collect(cfg, store, backend, pending, report, progress) -> None:
    remembered = store.server_mode(cfg.llm.base_url or "", cfg.llm.model)
    if remembered and cfg.llm.structured == "auto":
        backend.structured = remembered
    starting_mode = backend.structured
    collector = Collector(backend, store, cfg.llm, concurrency=cfg.concurrency, max_requests=cfg.max_requests,
                          retry=cfg.retry, max_tokens=cfg.max_tokens, progress=progress)

    async def run():
        try:
            return await collector.run(pending)
        finally:
            await backend.aclose()

    try:
        result = _run_coroutine(run)
    except FatalLLMError as exc:
        raise UserError(str(exc)) from None
    finally:
        if backend.structured != starting_mode:  # the server rejected a mode: remember what works
            store.remember_server_mode(cfg.llm.base_url or "", cfg.llm.model, backend.structured)
        report.http_requests = collector.result.http_requests
        report.answered = collector.result.answered
    report.failed = result.failed
    report.failed_sources = result.failed_sources
    if result.unasked:
        raise UserError(f"--max-requests {cfg.max_requests} spent: {result.unasked} prompt(s) not asked yet "
                        f"({result.answered} answered and kept); rerun to ask only those")


def _run_coroutine(factory):
    """asyncio.run, also from code that already runs an event loop (Jupyter): then on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _add_sources(store: PoolStore, names: NameSet) -> None:
    store.add_sources(names.dataset, "class", names.classes)
    store.add_sources(names.dataset, "domain", names.domains)


def _finish_derivation(store: PoolStore, backbone: BackboneSpec, threshold: float, device: str,
                       progress: Progress, report: BuildReport, names: NameSet | None = None) -> None:
    # A source with no usable answer at all would silently have no attributes: stop and say which.
    empty = store.sources_without_answer()
    if empty:
        shown = ", ".join(empty[:8]) + (f" and {len(empty) - 8} more" if len(empty) > 8 else "")
        raise UserError(f"no usable answer for {len(empty)} source(s) after all retries: {shown}; "
                        "answers so far are kept: rerun to retry them, or use a stronger model")
    if names is not None:
        # New names join the pool only once they have answers: a run that fails before this point
        # leaves a finished pool's classes and domains (and so its stats and lists) as they were.
        _add_sources(store, names)
    from .canonical import derive_attributes  # numpy and friends: not needed by a build with nothing to derive

    derived = derive_attributes(store, backbone, threshold, device=device, progress=progress)
    report.rebuilt = derived.rebuilt
    report.stats = store.stats()


def _close(store: PoolStore, pool: Path, outcome: str, *, created: bool) -> None:
    """"finish": move the pool into place; "keep": leave the work file for a later step;
    "failed": keep paid answers, but leave no file behind that holds none."""
    if outcome == "finish":
        store.finish(pool)
        return
    path = store.path
    # A journal left by a writer whose commit failed holds paid answers the pool itself lacks.
    worth_keeping = outcome == "keep" or store.has_paid_answers() or journal_path(path).exists()
    store.close()
    if created and not worth_keeping:
        for p in (path, path.with_name(path.name + ".wal")):
            p.unlink(missing_ok=True)


def ingest_batch_results(pool: Path, results_path: Path, *, threshold: float | None = None, device: str = "cpu",
                         progress: Progress | None = None) -> BuildReport:
    from .batchfile import read_batch_results

    results = read_batch_results(results_path)  # parse fully before touching the pool
    if _existing_work_file(pool) is None:
        raise UserError(f"pool {pool} not found; write the requests first with "
                        "`uniil attrs build ... --pool P --batch-file requests.jsonl`")
    store = PoolStore.open_for_write(pool)
    report = BuildReport(pool)
    outcome = "failed"
    try:
        rows = store.request_rows([r.custom_id for r in results])
        unknown = [r.custom_id for r in results if r.custom_id not in rows]
        if unknown:
            raise UserError(f"{len(unknown)} result(s) in {results_path.name} match no request of pool {pool.name} "
                            f"(e.g. custom_id {unknown[0][:16]}...); were they written for another pool?")
        done = store.answered_keys(list(rows))  # grows with this file's answers: a repeated custom_id counts once
        calls, failed = [], []
        for res in results:
            req = AttributeRequest.from_row(rows[res.custom_id])
            if req.key in done:
                report.reused += 1
                continue
            status = "error" if res.error else ("ok" if usable_phrases(res.text or "", req.source_name) else "unusable")
            calls.append(CallRecord(req.key, "batch", None, req.model, req.template, req.form, req.prompt_hash, None,
                                    0, status, res.error, res.text, None, res.prompt_tokens, res.completion_tokens))
            if status == "ok":
                done.add(req.key)
                report.answered += 1
            else:
                failed.append(req.key)
                report.failed += 1
                report.failed_sources[req.source_name] = report.failed_sources.get(req.source_name, 0) + 1
        store.record_calls(calls, failed)
        model, pretrained = store.meta("backbone_model"), store.meta("backbone_pretrained")
        backbone = BackboneSpec(model, pretrained or None)
        if threshold is None:
            threshold = float(store.meta("dedupe_threshold") or 0.9)
        pending = store.count_requests("pending")
        if pending:
            raise UserError(f"{pending} request(s) of pool {pool.name} still have no result; ingest their results "
                            "too (answers ingested so far are kept)")
        _finish_derivation(store, backbone, threshold, device, progress, report)
        outcome = "finish"
    finally:
        _close(store, pool, outcome, created=False)
    return report
