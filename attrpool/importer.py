"""`uniil attrs import`: a descriptor file's attributes into a pool, down the path LLM answers take.

Each class or domain of the file becomes one answered request of the pool's call log whose
"answer" is the file's phrases for it; the call names the file (backend "import", the file's
absolute path as base_url, "sha256:<hex>" as prompt_hash, template "import:<file name>"). The
pool's derivation (canonical.py) then normalises, dedupes, embeds and indexes them together with
every other answer, so `attrs list/stats/export`, matching and training see imported attributes
like any others, and each attribute's provenance names the file it came from.

Requests are keyed by the file's content, so importing the same file again adds nothing; an
edited file adds its phrases beside the earlier version's. Every check (layout, names, backbone)
runs before the pool is opened for writing: a refused import leaves no file and changes none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones.spec import BackboneSpec
from ..common import NullProgress, Progress
from ..data.registry import NAMES_DIR, NameSet, resolve_names
from ..errors import UserError
from ..prompts.templates import prompt_hash
from .canonical import IMPORT_TEMPLATE_PREFIX, derive_attributes
from .descriptors import DescriptorFile, Entry, match_names, read_descriptor_file
from .normalize import normalize_phrase, usable_phrase
from .store import CallRecord, PoolStore, dumps, partial_path

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.9  # `attrs build --dedupe-threshold`'s default


@dataclass
class ImportConfig:
    file: Path
    pool: Path
    dataset: str | None = None  # default: the file's own "dataset", else the existing pool's names
    classes_file: Path | None = None
    kind: str | None = None  # what a flat JSON file's keys name: "class" (default) or "domain"
    clip_model: str | None = None  # default: the existing pool's backbone, else BackboneSpec's
    clip_pretrained: str | None = None
    dedupe_threshold: float | None = None  # default: the existing pool's, else 0.9
    device: str = "cpu"


@dataclass
class ImportReport:
    pool: Path
    file: Path
    sha256: str
    format: str
    names_of: str  # whose names the file was checked against, e.g. "dataset synthetic"
    phrases: int
    covered: dict[str, int]  # kind -> classes / domains the file gives usable phrases
    known: dict[str, int]  # kind -> classes / domains of the dataset (or pool)
    skipped: list[str] = field(default_factory=list)  # named, but with no usable phrase
    added: int = 0  # sources recorded by this import; 0 when the file was imported before
    rebuilt: bool = False
    stats: dict = field(default_factory=dict)


@dataclass
class _PoolState:
    """What an existing pool says about itself, read before anything is written."""

    backbone: BackboneSpec
    threshold: float | None
    sources: dict[str, list[str]]


@dataclass
class _Imported:
    """One source's phrases as a request row and the call that answers it."""

    entry: Entry
    key: str
    request: tuple
    call: CallRecord


def import_attributes(cfg: ImportConfig, progress: Progress | None = None) -> ImportReport:
    progress = progress or NullProgress()
    if cfg.dedupe_threshold is not None and not 0.0 < cfg.dedupe_threshold <= 1.0:
        raise UserError(f"--dedupe-threshold {cfg.dedupe_threshold} is outside (0, 1]; 0.9 merges near-duplicates")
    file = read_descriptor_file(cfg.file, cfg.kind)
    backbone = _requested_backbone(cfg)
    names = _dataset_names(cfg, file)
    existing = _existing_pool(cfg.pool, backbone)
    if names is not None:
        known = {"class": list(names.classes), "domain": list(names.domains)}
        names_of, fix = f"dataset {names.dataset}", _names_hint(cfg, names)
    elif existing is not None:
        known, names_of = existing.sources, f"pool {cfg.pool.name}"
        fix = f"`uniil attrs list --pool {cfg.pool}` lists them; or pass --dataset"
    else:
        raise UserError(f"pool {cfg.pool} is new: name the dataset whose classes {file.path.name} describes "
                        "with --dataset NAME (or --classes FILE)")
    matched = match_names(file, known, names_of, fix)
    items, skipped = _imported(file, matched.entries)
    if not items:
        raise UserError(f"no usable attribute in {file.path.name}: every phrase is empty, names its own class, "
                        "or is not a description (e.g. 'attributes'); write phrases such as \"has four legs\"")
    if backbone is None:
        backbone = existing.backbone if existing is not None else BackboneSpec.from_options(None, None)
    threshold = cfg.dedupe_threshold or (existing.threshold if existing is not None else None) or DEFAULT_THRESHOLD
    answered = _answered(cfg.pool, [i.key for i in items]) if existing is not None else set()
    new = [i for i in items if i.key not in answered]
    report = ImportReport(cfg.pool, file.path, file.sha256, file.format, names_of, file.phrase_count,
                          {k: sum(i.entry.kind == k for i in items) for k in known},
                          {k: len(v) for k, v in known.items()}, skipped, len(new))
    _write(cfg.pool, backbone, names, new, threshold, cfg.device, progress, report)
    return report


def _requested_backbone(cfg: ImportConfig) -> BackboneSpec | None:
    if cfg.clip_model is None and cfg.clip_pretrained is None:
        return None
    return BackboneSpec.from_options(cfg.clip_model, cfg.clip_pretrained)


def _dataset_names(cfg: ImportConfig, file: DescriptorFile) -> NameSet | None:
    """The names to check the file against: --dataset/--classes, else the dataset the file says it
    was written for; None means the existing pool's own names."""
    if cfg.dataset and file.dataset and cfg.dataset != file.dataset:
        raise UserError(f"{file.path.name} was written for dataset {file.dataset}, not {cfg.dataset}; "
                        f"import it with --dataset {file.dataset} (or drop --dataset)")
    dataset = cfg.dataset or (file.dataset if cfg.classes_file is None else None)
    if dataset is None and cfg.classes_file is None:
        return None
    return resolve_names(dataset, cfg.classes_file)


def _names_hint(cfg: ImportConfig, names: NameSet) -> str:
    if cfg.classes_file is not None:
        return f"{cfg.classes_file} lists them"
    listed = NAMES_DIR / f"{names.dataset}.txt"
    if listed.exists():
        return f"data/names/{listed.name} lists the classes, data/datasets.yaml the domains"
    return f"the class folders of {cfg.dataset}"


def _existing_pool(pool: Path, backbone: BackboneSpec | None) -> _PoolState | None:
    if not pool.exists() and not partial_path(pool).exists():
        return None
    # A build's unfinished work file is refused here (open_for_read says how to finish it).
    with PoolStore.open_for_read(pool) as store:
        if backbone is not None:
            store.check_backbone(backbone.id, backbone.cli_options())
        threshold = store.meta("dedupe_threshold")
        return _PoolState(BackboneSpec(store.meta("backbone_model"), store.meta("backbone_pretrained") or None),
                          float(threshold) if threshold else None,
                          {kind: store.source_names(kind) for kind in ("class", "domain")})


def _answered(pool: Path, keys: list[str]) -> set[str]:
    with PoolStore.open_for_read(pool) as store:
        return store.answered_keys(keys)


def _key(file: DescriptorFile, entry: Entry) -> str:
    return prompt_hash({"import": file.sha256, "kind": entry.kind, "name": entry.name})


def _imported(file: DescriptorFile, entries: list[Entry]) -> tuple[list[_Imported], list[str]]:
    template = f"{IMPORT_TEMPLATE_PREFIX}{file.path.name}"
    model = f"file:{file.path.name}@{file.sha256[:12]}"
    payload = {"file": str(file.path.resolve()), "sha256": file.sha256, "format": file.format}
    items, skipped = [], []
    for e in entries:
        if not any(usable_phrase(normalize_phrase(p), e.name, authored=True) for p in e.phrases):
            skipped.append(e.name)
            continue
        key = _key(file, e)
        request = (key, e.kind, e.name, template, "file", model, len(e.phrases),
                   dumps({**payload, "kind": e.kind, "name": e.name}))
        call = CallRecord(key, "import", payload["file"], model, template, "file", f"sha256:{file.sha256}", None,
                          0, "ok", response=dumps({"attributes": e.phrases}))
        items.append(_Imported(e, key, request, call))
    if skipped:
        log.info("%s: no usable phrase for %s; skipped", file.path.name, ", ".join(skipped))
    return items, skipped


def _write(pool: Path, backbone: BackboneSpec, names: NameSet | None, new: list[_Imported], threshold: float,
           device: str, progress: Progress, report: ImportReport) -> None:
    created = not pool.exists() and not partial_path(pool).exists()  # never delete a killed build's answers
    store = PoolStore.open_for_write(pool)
    finished = False
    try:
        store.check_backbone(backbone.id, backbone.cli_options())
        store.set_meta("backbone_model", backbone.model)
        store.set_meta("backbone_pretrained", backbone.pretrained or "")
        store.add_requests([i.request for i in new])
        store.record_calls([i.call for i in new])
        if names is not None:  # the whole dataset, in label order, as `attrs build` adds it
            store.add_sources(names.dataset, "class", names.classes)
            store.add_sources(names.dataset, "domain", names.domains)
        derived = derive_attributes(store, backbone, threshold, device=device, progress=progress)
        report.rebuilt = derived.rebuilt
        report.stats = store.stats()
        finished = True
    finally:
        if finished:
            store.finish(pool)
        else:  # an existing pool keeps the recorded calls: the next import or build derives them
            path = store.path
            store.close()
            if created:  # nothing a rerun could reuse: the file is read again in no time
                for p in (path, path.with_name(path.name + ".wal")):
                    p.unlink(missing_ok=True)
