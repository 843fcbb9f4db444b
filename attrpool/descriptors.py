"""Reading published descriptor files for `uniil attrs import`, and checking their names.

Three layouts, told apart by extension and shape:

- JSON `{name: [phrases]}`: classify-by-description's descriptors ("has four legs"), CuPL's
  sentences ("A photo of a dog, which has ...") and `uniil attrs export --format json`. The keys
  name classes, or domains with `kind="domain"`.
- JSON with sections `{"dataset": ..., "about": ..., "classes": {...}, "domains": {...}}`: the
  reference files in data/attributes/ (both sections optional, `dataset` checked when given).
- CSV with a header row: `kind,source,attribute` (what `uniil attrs export --format csv` writes;
  `name` may stand for `source`), or two columns `class,attribute` / `domain,attribute`.

Attributes are tied to classes by name only, never by position: a name that is not one of the
dataset's is refused, so a misspelt or reordered file can never move attributes between classes.
Everything is checked before the pool is touched.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

KINDS = ("class", "domain")
SECTIONS = {"classes": "class", "domains": "domain"}
SECTION_EXTRAS = ("dataset", "about")  # a sectioned file's other keys: which dataset, and who wrote it
CSV_HEADERS = "kind,source,attribute (as `uniil attrs export --format csv` writes), class,attribute or domain,attribute"
JSON_LAYOUT = '{"class name": ["descriptor", ...]}'


@dataclass
class Entry:
    """The phrases a file gives one class or domain, under the name the file spells it."""

    kind: str
    name: str
    phrases: list[str] = field(default_factory=list)


@dataclass
class DescriptorFile:
    path: Path
    sha256: str
    format: str  # "json", "json-sections" or "csv"
    entries: list[Entry]
    dataset: str | None = None  # what a sectioned file says it was written for

    @property
    def phrase_count(self) -> int:
        return sum(len(e.phrases) for e in self.entries)


def name_key(name: str) -> str:
    """How names compare: the registry's rules (case does not matter; '_' reads as a space, as in
    ImageFolder roots), and spacing."""
    return " ".join(name.replace("_", " ").split()).casefold()


def read_descriptor_file(path: Path, kind: str | None = None) -> DescriptorFile:
    """The file's entries, fully checked for layout; UserError (one line) on anything malformed."""
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown --kind '{kind}'; use class or domain")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise UserError(f"{path.name}: unknown descriptor file type '{suffix or '(none)'}'; "
                        f"give a .json file ({JSON_LAYOUT}) or a .csv file ({CSV_HEADERS})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read descriptor file {path}: {exc.strerror}; check the path") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM is what spreadsheets write
    except UnicodeDecodeError:
        raise UserError(f"{path.name} is not UTF-8 text; save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path.name} is empty; write {JSON_LAYOUT} (.json) or a CSV with the header {CSV_HEADERS}")
    sha = hashlib.sha256(data).hexdigest()
    if suffix == ".csv":
        if kind is not None:
            raise UserError(f"--kind is for flat JSON files; {path.name} names the kind in its header or kind column")
        return DescriptorFile(path, sha, "csv", _read_csv(path, text))
    return _read_json(path, text, sha, kind)


def _read_json(path: Path, text: str, sha: str, kind: str | None) -> DescriptorFile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        f"descriptor files look like {JSON_LAYOUT}") from None
    if isinstance(data, list):
        raise UserError(f"{path.name} is a JSON list; attributes must be keyed by class name ({JSON_LAYOUT}), "
                        "never by position, so that no attribute lands on the wrong class")
    if not isinstance(data, dict):
        raise UserError(f"{path.name} holds {_json_type(data)}, not a JSON object; write {JSON_LAYOUT}")
    if not data:
        raise UserError(f"{path.name} is an empty JSON object; write {JSON_LAYOUT}")
    if any(isinstance(data.get(s), dict) for s in SECTIONS):
        if kind is not None:
            raise UserError(f"--kind is for flat JSON files; {path.name} has \"classes\"/\"domains\" sections")
        extra = sorted(set(data) - set(SECTIONS) - set(SECTION_EXTRAS))
        if extra:
            raise UserError(f"{path.name}: unknown top-level key(s) {', '.join(map(repr, extra))} beside the "
                            f"sections; a sectioned file has \"classes\", \"domains\", \"dataset\" and \"about\" only")
        entries = []
        for section, section_kind in SECTIONS.items():
            if section not in data:
                continue
            if not isinstance(data[section], dict):
                raise UserError(f"{path.name}: \"{section}\" must be an object {JSON_LAYOUT}, not "
                                f"{_json_type(data[section])}")
            entries += _json_entries(path, data[section], section_kind, f"\"{section}\" ")
        dataset = data.get("dataset")
        if dataset is not None and not isinstance(dataset, str):
            raise UserError(f"{path.name}: \"dataset\" must be a dataset name (a string)")
        return DescriptorFile(path, sha, "json-sections", entries, dataset)
    return DescriptorFile(path, sha, "json", _json_entries(path, data, kind or "class", ""))


def _json_entries(path: Path, data: dict, kind: str, where: str) -> list[Entry]:
    entries = []
    for name, phrases in data.items():
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            found = _json_type(phrases) if not isinstance(phrases, list) else "a list holding " + next(
                _json_type(p) for p in phrases if not isinstance(p, str))
            raise UserError(f"{path.name}: the value of {where}'{name}' is {found}, not a list of strings; "
                            f"each name maps to its phrases: {JSON_LAYOUT}")
        entries.append(Entry(kind, name, [p.strip() for p in phrases if p.strip()]))
    return entries


def _json_type(value) -> str:
    """A value's type as JSON names it, for messages about a file the user wrote."""
    kinds = {str: "a string", bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), "null")


def _read_csv(path: Path, text: str) -> list[Entry]:
    reader = csv.reader(io.StringIO(text))
    try:  # (line number, cells) of every row that is not blank
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except csv.Error as exc:
        raise UserError(f"{path.name} is not valid CSV ({exc}); write a header row {CSV_HEADERS}") from None
    if not rows:  # only separators or blank lines
        raise UserError(f"{path.name} has no rows; write a header row {CSV_HEADERS} and one attribute per row")
    header = [c.strip().lower() for c in rows[0][1]]
    col = {name: i for i, name in reversed(list(enumerate(header)))}
    source_col = col.get("source", col.get("name"))
    if "attribute" in col and "kind" in col and source_col is not None:
        fixed_kind, name_col = None, source_col
    elif "attribute" in col and ("class" in col) != ("domain" in col):
        fixed_kind = "class" if "class" in col else "domain"
        name_col = col[fixed_kind]
    else:
        raise UserError(f"{path.name}: the header row is '{','.join(header)}'; it must name the columns "
                        f"{CSV_HEADERS}")
    by_source: dict[tuple[str, str], Entry] = {}
    for line, row in rows[1:]:
        cell = lambda i: row[i].strip() if i < len(row) else ""  # noqa: E731
        kind, name, phrase = fixed_kind or cell(col["kind"]).lower(), cell(name_col), cell(col["attribute"])
        if kind not in KINDS:
            raise UserError(f"{path.name}, row {line}: kind '{kind}' is neither class nor domain")
        if not name:
            raise UserError(f"{path.name}, row {line}: no {kind} name; every row names the {kind} its attribute is of")
        entry = by_source.setdefault((kind, name), Entry(kind, name))
        if phrase:
            entry.phrases.append(phrase)
    return list(by_source.values())


@dataclass
class NameMatch:
    """A file's entries under the dataset's own spelling of each name."""

    entries: list[Entry]  # one per (kind, name), phrases of equally-named keys merged, file order
    missing: dict[str, list[str]]  # kind -> the dataset's names the file gives no entry


def match_names(file: DescriptorFile, known: Mapping[str, Sequence[str]], names_of: str, fix: str) -> NameMatch:
    """Map every entry onto a known name (known: kind -> names); refuse unknown names in one line.
    `names_of` says whose names these are ("dataset synthetic"), `fix` where to read them."""
    lookup = {kind: {name_key(n): n for n in names} for kind, names in known.items()}
    merged: dict[tuple[str, str], Entry] = {}
    unknown: dict[str, list[str]] = {}
    for e in file.entries:
        canonical = lookup.get(e.kind, {}).get(name_key(e.name))
        if canonical is None:
            unknown.setdefault(e.kind, []).append(e.name)
            continue
        merged.setdefault((e.kind, canonical), Entry(e.kind, canonical)).phrases.extend(e.phrases)
    if unknown:
        parts = [_unknown_names(kind, names, known.get(kind, ())) for kind, names in unknown.items()]
        raise UserError(f"{file.path.name} names {'; and '.join(parts)} that {names_of} does not have; names must "
                        f"match its names (case and spacing aside: {fix}), or attributes would land on the wrong "
                        "class; nothing was imported")
    missing = {kind: [n for n in names if (kind, n) not in merged] for kind, names in known.items()}
    return NameMatch(list(merged.values()), missing)


def _unknown_names(kind: str, names: list[str], known: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    close = difflib.get_close_matches(names[0], list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{len(names)} {'class(es)' if kind == 'class' else 'domain(s)'} {shown}{hint}"
