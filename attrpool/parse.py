"""Reading attribute lists out of LLM answers, however they come back.

Servers that honour a JSON schema return `{"attributes": [...]}`; others wrap JSON in prose or code
fences, answer with numbered or bulleted lists, or (completion form) continue one line of
semicolon- or comma-separated phrases. All of these are accepted.
"""

from __future__ import annotations

import json
import re

_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2023\u25e6]|\(?\d{1,3}[.):]|[a-z][.)])\s+", re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_OBJECT_KEYS = ("attribute", "name", "text", "phrase", "feature", "cue")
# Complete JSON strings, scanned left to right; group 2 marks keys (followed by a colon).
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"(\s*:)?')


def _strings_from_json(value) -> list[str] | None:
    if isinstance(value, dict):
        preferred = [value[k] for k in ("attributes", "features", "cues", "items") if isinstance(value.get(k), list)]
        lists = preferred or [v for v in value.values() if isinstance(v, list)]
        return _strings_from_json(lists[0]) if lists else None
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):
                out.extend(str(item[k]) for k in _OBJECT_KEYS if isinstance(item.get(k), str))
        return out
    return None


def _json_candidates(text: str) -> list[str]:
    candidates = [text] + _FENCE.findall(text)
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            candidates.append(text[i:j + 1])
    return candidates


def parse_attributes(text: str) -> list[str]:
    """The phrases of an answer, in order, unnormalised; [] when the answer holds none."""
    text = (text or "").strip()
    if not text:
        return []
    for candidate in _json_candidates(text):
        try:
            found = _strings_from_json(json.loads(candidate))
        except (json.JSONDecodeError, ValueError):
            continue
        if found is not None:
            return [s.strip() for s in found if s and s.strip()]
    if text[0] in "{[":
        # JSON cut off by max_tokens: keep the strings that were completed, drop the torn one.
        values = [m.group(1) for m in _JSON_STRING.finditer(text) if not m.group(2)]
        return [json.loads(f'"{v}"').strip() for v in values if v.strip()]
    lines = [ln for ln in (l.strip() for l in text.splitlines()) if ln]
    bulleted = [_BULLET.sub("", ln) for ln in lines if _BULLET.match(ln)]
    if len(bulleted) >= 2:
        return [b.strip() for b in bulleted if b.strip()]
    # One line of phrases (the completion form), or prose: split on ';', else ','.
    line = _BULLET.sub("", lines[0])
    parts = line.split(";") if ";" in line else line.split(",")
    return [p.strip() for p in parts if p.strip()]
