"""The bulk path: requests written as OpenAI Batch API JSONL (also what `vllm run-batch` reads) and
their results read back into the pool."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..common import atomic_path
from ..errors import UserError
from ..prompts.templates import answer_schema
from .llm import LLMSpec, answer_text, request_body

ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def write_batch_file(path: Path, requests, spec: LLMSpec, max_tokens: int, structured: str) -> int:
    """Write one Batch API line per request; custom_id is the request key. Returns the count."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in requests:
            body = request_body(spec.model, r.form, r.payload.get("messages"), r.payload.get("prompt"),
                                answer_schema(r.n), max_tokens, 0.0, 0, structured if r.form == "chat" else None)
            fh.write(json.dumps({"custom_id": r.key, "method": "POST", "url": ENDPOINTS[r.form], "body": body},
                                ensure_ascii=False) + "\n")
    return len(requests)


@dataclass
class BatchResult:
    custom_id: str
    text: str | None
    error: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def read_batch_results(path: Path) -> list[BatchResult]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read batch results {path}: {exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            custom_id = rec["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n} is not a Batch API result line (JSON with custom_id, response, error)") from None
        response = rec.get("response") or {}
        body = response.get("body") or {}
        status = response.get("status_code", 200 if body else None)
        if rec.get("error") or status != 200:
            err = rec.get("error") or {"status_code": status, "body": body}
            out.append(BatchResult(custom_id, None, json.dumps(err)[:500]))
            continue
        usage = body.get("usage") or {}
        out.append(BatchResult(custom_id, answer_text(body), None, usage.get("prompt_tokens"),
                               usage.get("completion_tokens")))
    return out
