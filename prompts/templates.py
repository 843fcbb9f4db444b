"""Prompt templates: versioned YAML files with a chat form and a few-shot completion form.

Small local models answer chat + JSON-schema requests with junk but continue few-shot lists well,
so every template has both forms; the backend decides which one it is sent in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import UserError

TEMPLATE_DIR = Path(__file__).parent
MAX_PHRASE_CHARS = 80


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    kind: str  # "class" or "domain"
    system: str
    user: str
    completion: str
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def chat_messages(self, name: str, n: int, context: str) -> list[dict[str, str]]:
        fields = {"name": name, "n": n, "context": context or "things"}
        return [{"role": "system", "content": self.system.strip()},
                {"role": "user", "content": self.user.format(**fields).strip()}]

    def completion_prompt(self, name: str, context: str) -> str:
        return self.completion.format(name=name, context=context or "things").rstrip()


def answer_schema(n: int) -> dict:
    """The JSON schema of an answer, bounded so a runaway model cannot fill max_tokens with one item."""
    return {
        "type": "object",
        "properties": {"attributes": {"type": "array", "minItems": 1, "maxItems": n,
                                      "items": {"type": "string", "maxLength": MAX_PHRASE_CHARS}}},
        "required": ["attributes"],
        "additionalProperties": False,
    }


def prompt_hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@lru_cache(maxsize=1)
def _all_templates() -> dict[str, PromptTemplate]:
    out: dict[str, PromptTemplate] = {}
    for path in sorted(TEMPLATE_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        t = PromptTemplate(name=raw["name"], version=int(raw["version"]), kind=raw["kind"],
                           system=raw["chat"]["system"], user=raw["chat"]["user"],
                           completion=raw["completion"], description=raw.get("description", ""))
        out[t.name] = t
    return out


def load_templates(names: list[str] | None = None) -> list[PromptTemplate]:
    """All templates, or the named ones (unknown names are a user error listing the known ones)."""
    known = _all_templates()
    if not names:
        return list(known.values())
    missing = [n for n in names if n not in known]
    if missing:
        raise UserError(f"unknown prompt template(s) {', '.join(missing)}; known: {', '.join(known)}")
    return [known[n] for n in names]
