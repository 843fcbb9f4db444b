"""What a build asks: one request per (source, template), keyed by who answers and exactly what is
asked, and a fingerprint of that plan that takes milliseconds at ten thousand classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..data.registry import NameSet
from ..prompts.templates import PromptTemplate, prompt_hash
from .dedupe import EMBEDDER_ID, MERGE_RULE_VERSION
from .normalize import NORMALIZER_VERSION
from .store import dumps


@dataclass(frozen=True)
class AttributeRequest:
    key: str
    source_kind: str
    source_name: str
    template: str  # "name@vN"
    form: str  # "chat" or "completion"
    model: str
    n: int
    payload: dict  # {"messages": [...]} or {"prompt": "..."}

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.payload)

    def row(self) -> tuple:
        return (self.key, self.source_kind, self.source_name, self.template, self.form, self.model,
                self.n, dumps(self.payload))

    @classmethod
    def from_row(cls, row: tuple) -> "AttributeRequest":
        key, kind, name, template, form, model, n, payload = row
        return cls(key, kind, name, template, form, model, n, json.loads(payload))


def plan_requests(names: NameSet, templates: list[PromptTemplate], n: int, form: str,
                  model: str) -> list[AttributeRequest]:
    out = []
    for t in templates:
        for name in _sources(names, t):
            payload = ({"prompt": t.completion_prompt(name, names.context)} if form == "completion"
                       else {"messages": t.chat_messages(name, n, names.context)})
            key = prompt_hash({"model": model, "form": form, "n": n, "payload": payload})
            out.append(AttributeRequest(key, t.kind, name, t.ref, form, model, n, payload))
    return out


def planned_count(names: NameSet, templates: list[PromptTemplate]) -> int:
    return sum(len(_sources(names, t)) for t in templates)


def plan_fingerprint(names: NameSet, templates: list[PromptTemplate], n: int, form: str, model: str,
                     settings: dict) -> str:
    """Changes whenever the requests a build plans, or `settings`, change.

    Rendering every prompt costs ~10 us each, seconds at ImageNet scale, so the fingerprint hashes
    what the plan is a function of instead: the names, the templates' full text, n, form and model.
    The keys planned for one source per template go in too, so that a change to how prompts are
    rendered or keyed changes the fingerprint as it changes the keys.
    """
    probe = NameSet(names.dataset, names.classes[:1], names.domains[:1], names.context)
    return prompt_hash({
        "names": [names.dataset, list(names.classes), list(names.domains), names.context],
        "templates": [asdict(t) for t in templates], "n": n, "form": form, "model": model,
        "probe": [r.key for r in plan_requests(probe, templates, n, form, model)], "settings": settings})


def derivation_settings(threshold: float, backbone_id: str) -> dict:
    """Everything besides the answers that the derived tables depend on."""
    return {"threshold": threshold, "backbone": backbone_id, "normalizer": NORMALIZER_VERSION, "embedder": EMBEDDER_ID,
            "merge_rule": MERGE_RULE_VERSION}


def _sources(names: NameSet, template: PromptTemplate) -> tuple[str, ...]:
    return names.classes if template.kind == "class" else names.domains
