"""The `uniil` command line. Heavy libraries (torch, open_clip, faiss, llama.cpp) are imported inside
the commands that need them, so `uniil --help` and no-op reruns stay fast."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError
from .trainer.demo import DEMO_DATASETS, DEMO_RUNS, DEMO_SCENARIO, DEMO_SETTINGS  # plain data: no heavy imports

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="Continual learning of CLIP guided by LLM-generated attributes.")
attrs_app = typer.Typer(no_args_is_help=True, help="Build and inspect attribute pools.")
app.add_typer(attrs_app, name="attrs")
scenario_app = typer.Typer(no_args_is_help=True, help="Continual-learning scenarios: presets and files.")
app.add_typer(scenario_app, name="scenario")
backbone_app = typer.Typer(no_args_is_help=True, help="Built-in offline CLIP backbones.")
app.add_typer(backbone_app, name="backbone")
methods_app = typer.Typer(help="Continual-learning methods and their --opt options.")
app.add_typer(methods_app, name="methods")

out = Console()
err = Console(stderr=True)

PoolOpt = Annotated[Path, typer.Option("--pool", help="Attribute pool file (DuckDB).")]
ClipModelOpt = Annotated[Optional[str], typer.Option(
    "--clip-model", help="open_clip model name (default ViT-B-16) or a built-in offline one: uniil-micro "
                         "(trained on the synthetic world on first use), uniil-tiny (random weights).")]
ClipPretrainedOpt = Annotated[Optional[str], typer.Option(
    "--clip-pretrained", help="open_clip pretrained tag (default openai), a checkpoint path, or 'none'.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# Training options shared by `train` and `bench`.
TrainPoolOpt = Annotated[Optional[Path], typer.Option(help="Attribute pool (needed by attribute-guided methods).")]
# Flags a recipe may set: None means "not given", so the scenario's recipe, then the built-in
# default (shown in brackets) fills it in; a flag given always wins.
EpochsOpt = Annotated[Optional[int], typer.Option(help="Epochs per step [recipe, else 1].", show_default=False)]
ItersOpt = Annotated[Optional[int], typer.Option(help="Optimiser steps per scenario step (overrides --epochs).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="Global batch size (split over DDP ranks) [recipe, else 64].",
                                                     show_default=False)]
LrOpt = Annotated[Optional[float], typer.Option(help="AdamW learning rate [recipe, else 1e-3].", show_default=False)]
WeightDecayOpt = Annotated[Optional[float], typer.Option(help="AdamW weight decay [recipe, else 0].", show_default=False)]
WarmupOpt = Annotated[Optional[int], typer.Option(help="Linear warm-up steps before the cosine schedule "
                                                       "[recipe, else 30].", show_default=False)]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (autocast) [recipe, else fp32].",
                                                     show_default=False)]
DataRootOpt = Annotated[Optional[Path], typer.Option(help="Where real datasets live.")]
DownloadOpt = Annotated[bool, typer.Option(help="Download torchvision datasets into --data-root.")]
TrainPerClassOpt = Annotated[Optional[int], typer.Option(
    help="Synthetic dataset: training images per class and step [recipe, else 40].", show_default=False)]
TestPerClassOpt = Annotated[Optional[int], typer.Option(
    help="Synthetic dataset: test images per class and step [recipe, else 10].", show_default=False)]
RecipeOpt = Annotated[Optional[str], typer.Option(
    help="Recipe YAML whose values fill in the flags and --opt not given; default: the scenario's shipped "
         "recipe (data/recipes/SCENARIO.yaml) if any; 'none' for the built-in defaults only.", show_default=False)]
EvalSplitOpt = Annotated[str, typer.Option(
    help="test: evaluate on the test split; val: train on 80% of each class's training images and evaluate "
         "on the other 20% (for choosing hyperparameters).")]


def _given_settings(**flags) -> dict:
    """The recipe-settable flags as TrainConfig fields (None: not given)."""
    names = {"train_per_class": "synthetic_train_per_class", "test_per_class": "synthetic_test_per_class"}
    return {names.get(k, k): v for k, v in flags.items()}


def _recipe(choice: Optional[str], scenario: str):
    from .trainer.recipes import find_recipe
    from .trainer.scenario import load_scenario

    return find_recipe(choice, load_scenario(scenario).name)

@app.callback()
def _global(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details to stderr.")] = False):
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    for noisy in ("httpx", "httpx2", "openai", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RichProgress:
    """The library's Progress protocol drawn as rich progress bars on stderr."""

    def __init__(self, keep_finished: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=err, transient=False)
        self._tasks: dict[str, int] = {}
        self._keep = keep_finished  # False: a finished bar disappears (long runs draw many)

    def __enter__(self):
        return self  # the display starts with the first bar: an early error leaves no blank line

    def __exit__(self, exc_type, *rest):
        if not self._bars.live.is_started:
            return
        if exc_type is None:
            self._bars.stop()
        elif self._bars.console.is_terminal:  # the error line is the whole story: erase the bars
            self._bars.live.transient = True
            self._bars.stop()
        else:  # not a terminal: drop the last frame stop() would print (a log keeps only the error)
            with self._bars.console.capture():
                self._bars.stop()

    def start(self, task, description, total):
        if not self._bars.live.is_started:
            self._bars.start()
        self._tasks[task] = self._bars.add_task(description, total=total)

    def advance(self, task, n=1):
        if task in self._tasks:
            self._bars.advance(self._tasks[task], n)

    def stop(self, task):
        if task in self._tasks:
            task_id = self._tasks.pop(task)
            self._bars.stop_task(task_id)
            if not self._keep:
                self._bars.remove_task(task_id)

    def print(self, text: str) -> None:
        """A line above the bars."""
        self._bars.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _ensure_backbone(model: Optional[str], pretrained: Optional[str] = None) -> None:
    """Trained built-in backbones train once on first use: show it with progress bars."""
    from .backbones.spec import BackboneSpec

    spec = BackboneSpec.from_options(model, pretrained)
    weights = spec.trained_weights()
    if weights is not None and not weights.exists():  # checked without importing torch
        from .backbones.factory import ensure_trained

        with RichProgress(keep_finished=False) as progress:
            ensure_trained(spec, progress)


def _split(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _pool_rows(s: dict, rebuilt: bool) -> list[tuple[str, object]]:
    """A finished pool's counts, as the build and import reports show them."""
    if not s:
        return []
    return [("classes / domains", f"{s['classes']} / {s['domains']}"),
            ("canonical attributes (class / domain)",
             f"{s['attributes']} ({s['class_attributes']} / {s['domain_attributes']})"),
            ("raw attributes", s["raw_attributes"]), ("backbone", f"{s['backbone']} (dim {s['dim']})"),
            ("index", s["index"]), ("derived", "rebuilt" if rebuilt else "up to date")]


def _print_report(report) -> None:
    t = Table(title=f"pool {report.pool}", show_header=False)
    rows = [("prompts planned", report.planned), ("answers reused from the pool", report.reused),
            ("answered now", report.answered), ("failed (no usable answer)", report.failed),
            ("HTTP requests made", report.http_requests)]
    for k, v in rows + _pool_rows(report.stats, report.rebuilt):
        t.add_row(k, str(v))
    out.print(t)
    if report.failed_sources:
        out.print("[yellow]prompts without a usable answer, by source:[/] " +
                  ", ".join(f"{k} ({v})" for k, v in sorted(report.failed_sources.items())))


@attrs_app.command("build")
def attrs_build(
    pool: PoolOpt,
    dataset: Annotated[Optional[str], typer.Option(help="Registry name (see the error for the list) or an ImageFolder root.")] = None,
    classes: Annotated[Optional[Path], typer.Option(help="File with one class name per line.")] = None,
    domains: Annotated[Optional[str], typer.Option(help="Comma-separated domains (styles), replacing the dataset's.")] = None,
    llm: Annotated[Optional[str], typer.Option(help="local, local:PATH.gguf, openai:MODEL, server:URL or an installed backend's NAME[:ARG] (default local).")] = None,
    llm_url: Annotated[Optional[str], typer.Option(help="Base URL of an OpenAI-compatible server, e.g. http://localhost:8000/v1.")] = None,
    llm_model: Annotated[Optional[str], typer.Option(help="Model name on --llm-url.")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="Environment variable holding the API key.")] = None,
    structured: Annotated[str, typer.Option(help="auto, json_schema, json_object or none.")] = "auto",
    llm_option: Annotated[Optional[list[str]], typer.Option("--llm-option", help="KEY=VALUE option of the LLM backend (repeatable), e.g. n_ctx=4096 for local.")] = None,
    form: Annotated[Optional[str], typer.Option(help="chat or completion (default: completion for local, chat otherwise).")] = None,
    templates: Annotated[Optional[str], typer.Option(help="Comma-separated prompt templates (default: all).")] = None,
    per_class: Annotated[int, typer.Option(help="Attributes asked for per prompt.")] = 8,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
    max_requests: Annotated[Optional[int], typer.Option(help="Budget of HTTP requests for this run (retries count).")] = None,
    retries: Annotated[int, typer.Option(help="Tries per prompt before it counts as failed.")] = 4,
    backoff: Annotated[float, typer.Option(help="Seconds before the first retry; doubles each retry (Retry-After wins if longer).")] = 0.5,
    timeout: Annotated[float, typer.Option(help="Seconds before one request times out.")] = 120.0,
    dedupe_threshold: Annotated[float, typer.Option(help="Cosine above which phrases merge.")] = 0.9,
    batch_file: Annotated[Optional[Path], typer.Option(help="Write pending requests as Batch API JSONL instead of asking.")] = None,
    clip_model: ClipModelOpt = None,
    clip_pretrained: ClipPretrainedOpt = None,
    device: Annotated[str, typer.Option(help="Device for the CLIP text tower.")] = "cpu",
):
    """Ask an LLM for visual attributes of every class and domain, dedupe, embed and index them."""
    from .attrpool.build import BuildConfig, build_pool
    from .attrpool.collect import RetryPolicy
    from .attrpool.llm import LLMSpec
    from .backbones.spec import BackboneSpec
    from .data.registry import resolve_names

    if retries < 1:
        raise UserError("--retries must be at least 1")
    _ensure_backbone(clip_model, clip_pretrained)
    cfg = BuildConfig(
        pool=pool, names=resolve_names(dataset, classes, _split(domains)),
        llm=LLMSpec.from_options(llm, llm_url, llm_model, api_key_env, structured, llm_option),
        backbone=BackboneSpec.from_options(clip_model, clip_pretrained), templates=_split(templates),
        per_class=per_class, concurrency=concurrency, max_requests=max_requests,
        dedupe_threshold=dedupe_threshold, form=form, batch_file=batch_file,
        retry=RetryPolicy(attempts=retries, base_s=backoff), timeout_s=timeout, device=device)
    with RichProgress() as progress:
        report = build_pool(cfg, progress)
    if report.batch_written is not None:
        out.print(f"wrote {report.batch_written} request(s) to {batch_file}; run them (OpenAI Batch API or "
                  f"`vllm run-batch -i {batch_file} -o results.jsonl --model MODEL`), then "
                  f"`uniil attrs ingest --pool {pool} results.jsonl`")
        return
    _print_report(report)


@attrs_app.command("ingest")
def attrs_ingest(
    results: Annotated[Path, typer.Argument(help="Batch API results JSONL.")],
    pool: PoolOpt,
    device: Annotated[str, typer.Option(help="Device for the CLIP text tower.")] = "cpu",
):
    """Load Batch API results written for `attrs build --batch-file`, then finish the pool."""
    from .attrpool.build import ingest_batch_results

    with RichProgress() as progress:
        report = ingest_batch_results(pool, results, device=device, progress=progress)
    _print_report(report)


@attrs_app.command("stats")
def attrs_stats(pool: PoolOpt, as_json: JsonOpt = False):
    """Counts of a pool: classes, domains, attributes, LLM calls, backbone."""
    from .attrpool.store import PoolStore

    with PoolStore.open_for_read(pool) as store:
        stats = store.stats()
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    t = Table(title=f"pool {pool}", show_header=False)
    for k, v in stats.items():
        t.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    out.print(t)


def _attributes(pool: Path, kind: Optional[str], name: Optional[str]) -> dict[str, list[str]]:
    from .attrpool.store import PoolStore

    with PoolStore.open_for_read(pool) as store:
        if name is not None and name not in store.source_names(kind):
            raise UserError(f"{kind} '{name}' is not in pool {pool}; `uniil attrs list --pool {pool}` shows its sources")
        return store.attributes_by_source(kind, name)


@attrs_app.command("list")
def attrs_list(
    pool: PoolOpt,
    class_: Annotated[Optional[str], typer.Option("--class", help="Only this class.")] = None,
    domain: Annotated[Optional[str], typer.Option(help="Only this domain.")] = None,
    as_json: JsonOpt = False,
):
    """The canonical attributes of each class and domain."""
    if class_ and domain:
        raise UserError("give --class or --domain, not both")
    kind = "class" if class_ else "domain" if domain else None
    found = _attributes(pool, kind, class_ or domain)
    if as_json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return
    t = Table("source", "attributes")
    for src, attrs in found.items():
        t.add_row(src, "; ".join(attrs))
    out.print(t)


@attrs_app.command("export")
def attrs_export(
    pool: PoolOpt,
    fmt: Annotated[str, typer.Option("--format", help="json ({class: [attributes]}) or csv (kind,source,attribute).")] = "json",
    kind: Annotated[str, typer.Option(help="class, domain or all.")] = "class",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="File to write (default stdout).")] = None,
):
    """Export attributes for classify-by-description tools (json) or spreadsheets (csv)."""
    import csv
    import io

    if fmt not in ("json", "csv"):
        raise UserError(f"unknown --format '{fmt}'; use json or csv")
    if kind not in ("class", "domain", "all"):
        raise UserError(f"unknown --kind '{kind}'; use class, domain or all")
    kinds = ("class", "domain") if kind == "all" else (kind,)
    by_kind = {k: _attributes(pool, k, None) for k in kinds}
    if fmt == "json":
        merged = {src: attrs for k in kinds for src, attrs in by_kind[k].items()}
        text = json.dumps(merged, indent=2, ensure_ascii=False) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["kind", "source", "attribute"])
        for k in kinds:
            for src, attrs in by_kind[k].items():
                w.writerows([k, src, a] for a in attrs)
        text = buf.getvalue()
    if output is None:
        sys.stdout.write(text)
    else:
        from .common import atomic_write_text

        atomic_write_text(output, text)
        err.print(f"wrote {output}")


@attrs_app.command("import")
def attrs_import(
    file: Annotated[Path, typer.Argument(help="Descriptor file: JSON {class: [descriptors]} (classify-by-description, "
                                              "CuPL, `attrs export`), JSON with \"classes\"/\"domains\" sections, "
                                              "or CSV with the header kind,source,attribute.")],
    pool: PoolOpt,
    dataset: Annotated[Optional[str], typer.Option(help="Registry name or ImageFolder root whose names the file uses "
                                                        "(default: the file's \"dataset\", else the pool's names).")] = None,
    classes: Annotated[Optional[Path], typer.Option(help="File with one class name per line (instead of --dataset).")] = None,
    kind: Annotated[Optional[str], typer.Option(help="What a flat JSON file's keys name: class or domain [class].",
                                                show_default=False)] = None,
    dedupe_threshold: Annotated[Optional[float], typer.Option(
        help="Cosine above which phrases merge [the pool's, else 0.9].", show_default=False)] = None,
    clip_model: ClipModelOpt = None,
    clip_pretrained: ClipPretrainedOpt = None,
    device: Annotated[str, typer.Option(help="Device for the CLIP text tower.")] = "cpu",
):
    """Add a published descriptor file's attributes to a pool (normalised, deduped, embedded, indexed)."""
    from .attrpool.importer import ImportConfig, import_attributes

    if clip_model is not None:
        _ensure_backbone(clip_model, clip_pretrained)
    cfg = ImportConfig(file, pool, dataset, classes, kind, clip_model, clip_pretrained, dedupe_threshold, device)
    with RichProgress() as progress:
        report = import_attributes(cfg, progress)
    t = Table(title=f"pool {report.pool}", show_header=False)
    covered = " / ".join(f"{report.covered[k]} of {report.known[k]}" for k in ("class", "domain"))
    rows = [("file", f"{report.file} ({report.format}, sha256 {report.sha256[:16]}...)"),
            ("phrases in the file", report.phrases), (f"classes / domains of {report.names_of} described", covered),
            ("imported now", f"{report.added} class(es)/domain(s)" if report.added else "nothing: imported before")]
    for k, v in rows + _pool_rows(report.stats, report.rebuilt):
        t.add_row(k, str(v))
    out.print(t)
    if report.skipped:
        out.print("[yellow]named in the file but without a usable phrase:[/] " + ", ".join(report.skipped))


@attrs_app.command("match")
def attrs_match(
    pool: PoolOpt,
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files or folders of images.")] = None,
    top_k: Annotated[int, typer.Option(help="Attributes per image.")] = 5,
    kind: Annotated[str, typer.Option(help="class, domain or all.")] = "all",
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated classes whose attributes may match.")] = None,
    as_json: JsonOpt = False,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Match a dataset split instead of files: synthetic, a registry name, or an ImageFolder root.")] = None,
    split: Annotated[str, typer.Option(help="Dataset split.")] = "test",
    domain: Annotated[Optional[str], typer.Option(help="Dataset domain.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many dataset images (spread over classes).")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Where registry datasets live (ImageFolder layout).")] = None,
    cache: Annotated[bool, typer.Option("--cache", help="Encode and match a whole dataset split once, and cache it "
                                                       "for training and later calls.")] = False,
    clip_model: ClipModelOpt = None,
    clip_pretrained: ClipPretrainedOpt = None,
    device: Annotated[str, typer.Option(help="Device for the CLIP image tower.")] = "cpu",
):
    """Show which attributes of a pool each image calls up."""
    from .attrpool.match import match_images
    from .backbones.spec import BackboneSpec
    from .data.images import dataset_images, image_files

    if bool(images) == bool(dataset):
        raise UserError("name images (files or folders) or --dataset NAME, one of the two")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    if cache and (images or limit):
        raise UserError("--cache works on a whole dataset split: give --dataset NAME without --limit")
    if cache and (kind != "all" or classes or html_out):
        raise UserError("--cache stores the unfiltered top-k of a whole split: drop --kind, --classes and --html "
                        "(or drop --cache to see filtered matches)")
    source = image_files(images) if images else dataset_images(dataset, split, domain, data_root, limit)
    backbone = BackboneSpec.from_options(clip_model, clip_pretrained) if (clip_model or clip_pretrained) else None
    if cache:
        _match_cached(pool, source, top_k, backbone, device, as_json)
        return
    with RichProgress() as progress:
        report = match_images(pool, source, top_k=top_k, kind=kind, classes=_split(classes),
                              backbone=backbone, device=device, progress=progress)
    for key, reason in report.failures:
        err.print(f"skipped {key}: {reason}", markup=False, highlight=False)
    if as_json:
        print(json.dumps([{"image": key, "matches": [{"attribute": m.attribute, "score": round(m.score, 6),
                                                      "kind": m.kind, "sources": m.sources} for m in found]}
                          for key, found in report.results], indent=2, ensure_ascii=False))
    else:
        for key, found in report.results:
            t = Table("rank", "attribute", "score", "kind", "sources", title=key, title_justify="left")
            for rank, m in enumerate(found, 1):
                t.add_row(str(rank), m.attribute, f"{m.score:.3f}", m.kind, ", ".join(m.sources[:4]))
            out.print(t)
    if html_out is not None and report.results:
        from .attrpool.match_html import write_match_html

        index = {k: i for i, k in enumerate(source.keys)}
        items = [(key, source.load(index[key]), found) for key, found in report.results]
        write_match_html(html_out, str(pool), items, report.failures)
        err.print(f"wrote {html_out}")
    if report.failures:
        err.print(f"{len(report.failures)} of {len(source)} image(s) could not be read", markup=False)
    if not report.results:
        raise UserError(f"none of the {len(source)} image(s) could be read")


def _match_cached(pool, source, top_k, backbone, device, as_json) -> None:
    import time

    from .attrpool.cache import cached_matches
    from .attrpool.match import PoolAttributes
    from .common import cache_dir

    attrs = PoolAttributes.load(pool)
    attrs.require_backbone(backbone, pool)
    start = time.perf_counter()
    with RichProgress() as progress:
        found = cached_matches(attrs, source, top_k, device=device, progress=progress)
    if as_json:
        print(json.dumps([{"image": key, "matches": [
            {"attribute": attrs.texts[i], "score": round(float(s), 6), "kind": str(attrs.kinds[i]),
             "sources": attrs.sources[i]} for i, s in zip(ids, scores) if i >= 0]}
            for key, ids, scores in zip(source.keys, found.ids, found.scores)], indent=2, ensure_ascii=False))
    bad = int((~found.valid).sum())
    how = lambda cached: "read from" if cached else "computed into"  # noqa: E731
    err.print(f"{len(source)} image(s) of {source.dataset}/{source.split}/{source.domain or '-'}: features "
              f"{how(found.features_from_cache)}, top-{top_k} matches {how(found.from_cache)} the cache "
              f"({cache_dir()}) in {time.perf_counter() - start:.2f} s"
              + (f"; {bad} unreadable image(s) skipped" if bad else ""), markup=False, highlight=False)


@attrs_app.command("eval")
def attrs_eval(
    pool: PoolOpt,
    dataset: Annotated[str, typer.Option(help="synthetic, a registry name, or an ImageFolder root.")],
    split: Annotated[str, typer.Option(help="Dataset split.")] = "test",
    domain: Annotated[Optional[str], typer.Option(help="Dataset domain.")] = None,
    beta: Annotated[float, typer.Option(help="Weight of the attribute mean in enriched prototypes.")] = 1.0,
    data_root: Annotated[Optional[Path], typer.Option(help="Where registry datasets live (ImageFolder layout).")] = None,
    as_json: JsonOpt = False,
    device: Annotated[str, typer.Option(help="Device for CLIP.")] = "cpu",
):
    """Zero-shot accuracy: class-name prompts vs classification by description vs enriched prototypes."""
    import numpy as np

    from .attrpool.match import PoolAttributes
    from .attrpool.zeroshot import evaluate
    from .backbones.factory import load_backbone
    from .backbones.features import image_features
    from .data.images import dataset_images

    source = dataset_images(dataset, split, domain, data_root, None)
    if source.labels is None:
        raise UserError(f"dataset {dataset} has no labels to evaluate against")
    attrs = PoolAttributes.load(pool)
    with RichProgress() as progress:
        feats = image_features(source, attrs.backbone, device=device, progress=progress)
    clip = load_backbone(attrs.backbone, device=device)
    labels = np.asarray(source.labels)
    result = evaluate(attrs, clip, feats.features[feats.valid], labels[feats.valid], source.classes, beta)
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    t = Table("classifier", "accuracy (%)", title=f"zero-shot on {source.dataset}/{split}/{source.domain or '-'}, "
                                                    f"{result.images} images, backbone {attrs.backbone.id}")
    t.add_row("class names (a photo of a {c}.)", f"{result.class_names:.1f}")
    t.add_row("descriptions (mean attribute similarity)", f"{result.descriptions:.1f}")
    t.add_row(f"enriched prototypes (beta = {beta:g})", f"{result.enriched:.1f}")
    out.print(t)


@backbone_app.command("build")
def backbone_build(
    name: Annotated[str, typer.Argument(help="A trained built-in backbone: uniil-micro.")],
    force: Annotated[bool, typer.Option(help="Train again, with the shipped recipe, even where weights exist; "
                                             "then compare its figures with the shipped weights'.")] = False,
    images: Annotated[Optional[int], typer.Option(help="Pre-training images (default: the shipped recipe's). "
                                                       "Smaller is a quick smoke run, not the shipped model.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: the shipped recipe's).")] = None,
    per_class: Annotated[int, typer.Option(help="Test images per class and domain for the comparison.")] = 20,
):
    """Train a built-in offline backbone into the cache (uniil-micro's weights otherwise ship with uniil)."""
    from .backbones.spec import TRAINED_BUILTINS, BackboneSpec

    if name not in TRAINED_BUILTINS:
        raise UserError(f"unknown trained backbone '{name}'; built in: {', '.join(TRAINED_BUILTINS)}")
    for flag, value in (("--images", images), ("--epochs", epochs), ("--per-class", per_class)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    spec = BackboneSpec.from_options(name, None)
    shipped = spec.shipped_weights()
    if not force:
        where = (f"ships with uniil: {shipped}" if shipped.exists() else
                 f"is already trained: {spec.cached_weights()}" if spec.cached_weights().exists() else None)
        if where:
            out.print(f"{name} {where} (--force trains it again and compares)", markup=False, highlight=False)
            return
    from dataclasses import replace

    from .backbones.micro_train import Recipe, train_and_cache

    recipe = replace(Recipe(), **{k: v for k, v in (("images", images), ("epochs", epochs)) if v is not None})
    start = time.perf_counter()
    with RichProgress(keep_finished=False) as progress:
        path = train_and_cache(recipe, progress=progress)
    out.print(f"trained {name} in {time.perf_counter() - start:.0f} s: {path}", markup=False, highlight=False)
    if recipe != Recipe():
        out.print(f"(a shorter recipe than the shipped one: {recipe.images} images, {recipe.epochs} epochs)",
                  markup=False, highlight=False)
    _compare_backbones(name, path, shipped if shipped.exists() else None, per_class)


def _show_backbone(spec) -> None:
    """The demo's first lines: which uniil-micro, and what it can do zero-shot on the synthetic world."""
    from .backbones.factory import load_backbone
    from .backbones.micro_eval import figures

    out.rule(f"uniil demo: the backbone, {spec.id} ({spec.trained_weights()})")
    with out.status("zero-shot on the synthetic test split"):
        f = figures(load_backbone(spec), per_class=10)
    t = Table("zero-shot by", *f.class_names, title="uniil-micro zero-shot accuracy (%), 10 test images per class")
    t.add_row("class names (\"a photo of a {}.\")", *(f"{v:.1f}" for v in f.class_names.values()))
    t.add_row("the reference descriptions", *(f"{v:.1f}" for v in f.descriptions.values()))
    out.print(t)


def _compare_backbones(name: str, rebuilt: Path, shipped: Optional[Path], per_class: int) -> None:
    """Zero-shot by class name and by the reference descriptions, rebuilt against shipped, per domain."""
    from .backbones.factory import load_backbone
    from .backbones.micro_eval import figures
    from .backbones.spec import BackboneSpec

    with out.status("zero-shot figures on the synthetic test split"):
        new = figures(load_backbone(BackboneSpec.from_options(name, str(rebuilt))), per_class)
        old = figures(load_backbone(BackboneSpec.from_options(name, None)), per_class) if shipped else None
    t = Table("zero-shot by", "domain", "rebuilt (%)", *(("shipped (%)", "difference") if old else ()),
              title=f"{name}: {per_class} test images per class and domain")
    for (kind, domain, acc), *rest in zip(new.rows(), *([old.rows()] if old else [])):
        cells = (f"{rest[0][2]:.1f}", f"{acc - rest[0][2]:+.1f}") if rest else ()
        t.add_row(kind, domain, f"{acc:.1f}", *cells)
    out.print(t)
    out.print(f"use the rebuilt weights with --clip-model {name} --clip-pretrained {rebuilt}", markup=False,
              highlight=False)


@scenario_app.command("show")
def scenario_show(name: Annotated[str, typer.Argument(help="A preset name or a scenario YAML file.")],
                  as_json: JsonOpt = False):
    """The steps of a scenario and the kind of increment each one is."""
    from .trainer.scenario import load_scenario

    sc = load_scenario(name)
    if as_json:
        print(json.dumps({"name": sc.name, "steps": [
            {"dataset": s.dataset, "domain": s.domain, "kind": s.kind, "classes": list(s.classes)} for s in sc.steps]},
            indent=2, ensure_ascii=False))
        return
    t = Table("step", "increment", "dataset", "domain", "classes", title=f"{sc.name}: {sc.description}")
    for i, s in enumerate(sc.steps, 1):
        shown = ", ".join(s.classes[:4]) + (f", ... ({len(s.classes)})" if len(s.classes) > 4 else "")
        t.add_row(str(i), s.kind, s.dataset, s.domain, shown)
    out.print(t)


@scenario_app.command("list")
def scenario_list():
    """The preset scenarios."""
    from .trainer.scenario import known_scenarios

    for name in known_scenarios():
        out.print(name)


def _method_options(items: list[str]) -> dict[str, str]:
    """`--opt key=value` pairs as text; the method's declared options type and check them."""
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--opt {item!r}: write key=value, e.g. --opt adapter_rank=32")
        opts[key.strip().replace("-", "_")] = value
    return opts


def _step_line(s) -> str:
    speed = f", {s.images_per_s:.0f} img/s" if s.images_per_s else ""
    return (f"step {s.index}/{s.total} [{s.kind}] {s.name}: accuracy {s.accuracy:.1f}%, mean over seen steps "
            f"{s.seen_mean:.1f}% (train {s.train_s:.1f} s{speed}, eval {s.eval_s:.1f} s)")


@app.command("train")
def train(
    scenario: Annotated[str, typer.Option(help="A preset (uniil scenario list) or a scenario YAML file.")],
    method: Annotated[str, typer.Option(help="zeroshot, finetune, ... (uniil methods lists them).")],
    out: Annotated[Path, typer.Option(help="Run directory: config, checkpoints, metrics.json.")],
    pool: TrainPoolOpt = None,
    clip_model: ClipModelOpt = None,
    clip_pretrained: ClipPretrainedOpt = None,
    epochs: EpochsOpt = None,
    iters: ItersOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    weight_decay: WeightDecayOpt = None,
    warmup: WarmupOpt = None,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same machine, same metrics.")] = 0,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    train_per_class: TrainPerClassOpt = None,
    test_per_class: TestPerClassOpt = None,
    recipe: RecipeOpt = None,
    eval_split: EvalSplitOpt = "test",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out after its last finished step.")] = False,
    opt: Annotated[list[str], typer.Option(
        "--opt", help="Method option key=value (repeatable); uniil methods show METHOD lists them.")] = [],
):
    """Continual learning over a scenario; writes OUT/metrics.json and a checkpoint after every step.
    Settings not given come from the scenario's recipe (uniil sweep writes recipes), then the defaults."""
    from .trainer.engine import train as run_training
    from .trainer.recipes import train_config

    global _interrupt_hint
    _interrupt_hint = f"interrupted; finished steps are kept in {out}: rerun the same command with --resume to continue"
    given = _given_settings(epochs=epochs, iters=iters, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            warmup=warmup, precision=precision, train_per_class=train_per_class,
                            test_per_class=test_per_class)
    given.update(pool=pool, clip_model=clip_model, clip_pretrained=clip_pretrained, seed=seed, device=device,
                 data_root=data_root, download=download, resume=resume, eval_split=eval_split)
    cfg = train_config(scenario, method, out, _recipe(recipe, scenario), given, _method_options(opt))
    cfg.validate()
    _ensure_backbone(clip_model, clip_pretrained)
    with RichProgress(keep_finished=False) as progress:
        run_training(cfg, progress, on_step=lambda s: progress.print(_step_line(s)))
    from .trainer.report import load_run

    _print_runs([load_run(out)])


@methods_app.callback(invoke_without_command=True)
def methods_list(ctx: typer.Context, as_json: JsonOpt = False):
    """The continual-learning methods (built-in, dropped into trainer/methods/, or installed plugins)."""
    if ctx.invoked_subcommand is not None:
        return
    from .trainer.methods import known_methods, method_class

    names = known_methods()
    if as_json:
        print(json.dumps({n: method_class(n).description() for n in names}, indent=2, ensure_ascii=False))
        return
    t = Table("method", "description", title="methods (uniil methods show NAME lists a method's --opt options)")
    for name in names:
        t.add_row(name, method_class(name).description())
    out.print(t)


@methods_app.command("show")
def methods_show(name: Annotated[str, typer.Argument(help="A method name (uniil methods lists them).")],
                 as_json: JsonOpt = False):
    """A method's --opt options: type, default, choices and what each does; its presets."""
    from .trainer.methods import method_class
    from .typed_options import format_value, option_specs

    cls = method_class(name)
    specs = sorted(option_specs(cls.Options, cls.presets), key=lambda s: s.name != "preset")  # first: it sets others
    defaults = cls.options_record({})  # the default preset applied: what a run without --opt gets
    if as_json:
        print(json.dumps({"name": name, "description": cls.description(), "needs_pool": cls.pool_need(),
                          "options": [{"name": s.name, "type": s.type_name, "default": defaults[s.name],
                                       "choices": list(s.choices) if s.choices else None, "help": s.help}
                                      for s in specs],
                          "presets": cls.presets}, indent=2, ensure_ascii=False))
        return
    t = Table("option", "type", "default", "choices", "help", title=f"{name}: {cls.description()}")
    for s in specs:
        t.add_row(s.name, s.type_name, format_value(defaults[s.name]),
                  ", ".join(map(str, s.choices)) if s.choices else "", s.help)
    out.print(t)
    for preset, bundle in cls.presets.items():
        shown = " ".join(f"{k}={format_value(v)}" for k, v in bundle.items())
        out.print(f"presets: --opt preset={preset} sets {shown}", markup=False, highlight=False)
    need = cls.pool_need()
    if need != "never":
        out.print(f"{name} needs --pool (an attribute pool built with the run's backbone)"
                  + (" with some option values: see their help" if need != "always" else ""), markup=False)


def _print_runs(runs) -> None:
    """One row per run; columns that hold the same value for every run move into the title."""
    from .trainer.report import COLUMNS, comparison_rows, format_row

    rows = comparison_rows(runs)
    shown = [(k, h) for k, h in COLUMNS if not k.startswith("task_il") or any(r[k] is not None for r in rows)]
    common = [(k, h) for k, h in shown if k in ("scenario", "backbone", "method") and len(rows) > 1
              and len({r[k] for r in rows}) == 1] if len(rows) > 1 else [(k, h) for k, h in shown
                                                                          if k in ("scenario", "backbone")]
    keep = [(k, h) for k, h in shown if (k, h) not in common]
    title = "accuracy (%), class-IL unless marked task-IL" + "".join(f"; {h} {rows[0][k]}" for k, h in common)
    t = Table(*[h for _, h in keep], title=title)
    for row in rows:
        cells = dict(zip([k for k, _ in COLUMNS], format_row(row)))
        t.add_row(*(cells[k] for k, _ in keep))
    out.print(t)


@app.command("report")
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by `uniil train`.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the plots and report.html go.")] = Path("report"),
):
    """Compare runs: a table of the field's metrics, accuracy-matrix heatmaps, curves, one HTML page."""
    from .trainer.report import load_runs, write_report

    runs = load_runs(run_dirs)
    _print_runs(runs)
    html = write_report(runs, out_dir)
    out.print(f"report: {html}", markup=False, highlight=False)


def _bench_line(o) -> str:
    """One line per finished cell of the bench grid."""
    if o.failed:
        return f"{o.method} seed {o.seed}: FAILED: {o.reason}"
    last = o.metrics()["last"]
    shown = f", Last {last:.1f}%" if last is not None else ""
    return f"{o.method} seed {o.seed}: {o.status}{shown} ({o.path})"


def _bench_settings(out_dir, pool, clip_model, clip_pretrained, device, data_root, download, eval_split, **flags):
    """(TrainConfig with what was given over the defaults, names of the recipe-settable settings given)."""
    from .trainer.config import TrainConfig

    given = {k: v for k, v in _given_settings(**flags).items() if v is not None}
    settings = TrainConfig("", "", out_dir, pool, clip_model, clip_pretrained, device=device, data_root=data_root,
                           download=download, eval_split=eval_split, **given)
    return settings, list(given)


def _run_grid(run, cfg, out_dir: Path, clip_model, clip_pretrained):
    """Run a bench or a sweep (`run`: run_bench or run_sweep) with a progress bar over its grid and a
    line per finished run; Ctrl-C says how to continue."""
    global _interrupt_hint
    _interrupt_hint = f"interrupted; finished runs are kept in {out_dir}: rerun the same command to continue"
    _ensure_backbone(clip_model, clip_pretrained)
    with RichProgress(keep_finished=False) as progress:
        return run(cfg, progress, on_run=lambda o: progress.print(_bench_line(o)))


def _print_bench(result, scenario: str, out_dir: Path, what: str = "bench") -> None:
    from .trainer.bench import BENCH_JSON, BENCH_MD, CURVES_PNG, SUMMARY_HEADERS, failed_lines, summary_rows

    t = Table(*SUMMARY_HEADERS, title=f"{scenario}: accuracy (%), class-IL unless marked task-IL; "
                                      "mean ± std over seeds (n - 1)" + (", validation split" if what == "sweep" else ""))
    for row in summary_rows(result):
        t.add_row(*row)
    out.print(t)
    for line in failed_lines(result):
        out.print(f"failed: {line}", markup=False, highlight=False)
    written = [out_dir / BENCH_MD, out_dir / BENCH_JSON, out_dir / CURVES_PNG, out_dir / "report" / "report.html"]
    out.print("wrote " + ", ".join(str(p) for p in written if p.exists()), markup=False, highlight=False)


@app.command("bench")
def bench(
    scenario: Annotated[str, typer.Option(help="A preset (uniil scenario list) or a scenario YAML file.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods, e.g. zeroshot,finetune (uniil methods lists "
                                              "them); LABEL=METHOD adds a variant, e.g. mage-noattr=mage with "
                                              "--opt mage-noattr:no_attributes=true.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bench folder: runs/<method>-seed<k>/, bench.json, bench.md, "
                                                        "curves.png, report/.")],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; every method runs once per seed.")] = "0,1,2",
    pool: TrainPoolOpt = None,
    clip_model: ClipModelOpt = None,
    clip_pretrained: ClipPretrainedOpt = None,
    epochs: EpochsOpt = None,
    iters: ItersOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    weight_decay: WeightDecayOpt = None,
    warmup: WarmupOpt = None,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    train_per_class: TrainPerClassOpt = None,
    test_per_class: TestPerClassOpt = None,
    recipe: RecipeOpt = None,
    opt: Annotated[list[str], typer.Option(
        "--opt", help="Method option key=value for every method, or METHOD:key=value for one (repeatable).")] = [],
):
    """Every method x seed on one scenario as `uniil train` runs (a rerun skips finished runs and resumes
    interrupted ones); mean ± std over seeds in OUT/bench.md and bench.json, curves, a report of every run.
    Each method gets the scenario recipe's values for what is not given."""
    from .trainer.bench import BENCH_MD, bench_config, run_bench, validate

    settings, given = _bench_settings(out_dir, pool, clip_model, clip_pretrained, device, data_root, download, "test",
                                      epochs=epochs, iters=iters, batch_size=batch_size, lr=lr,
                                      weight_decay=weight_decay, warmup=warmup, precision=precision,
                                      train_per_class=train_per_class, test_per_class=test_per_class)
    cfg = bench_config(scenario, methods, seeds, out_dir, settings, opt, _recipe(recipe, scenario), given)
    validate(cfg)  # before a built-in backbone trains: a mistake costs nothing and writes nothing
    result = _run_grid(run_bench, cfg, out_dir, clip_model, clip_pretrained)
    _print_bench(result, scenario, out_dir)
    if result.failed:
        raise UserError(f"{len(result.failed)} of {len(result.runs)} runs failed (listed in {out_dir / BENCH_MD}); "
                        "rerun the same command to retry them")


@app.command("sweep")
def sweep(
    scenario: Annotated[str, typer.Option(help="A preset (uniil scenario list) or a scenario YAML file.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods whose values to choose.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Sweep folder: one run per candidate and seed, bench.md, ...")],
    write: Annotated[Path, typer.Option(help="The recipe file to write (methods not swept are kept from --recipe).")],
    lrs: Annotated[str, typer.Option(help="Learning rates every trained method is tried with.")] = "3e-4,1e-3,3e-3",
    grid: Annotated[list[str], typer.Option(
        "--grid", help="METHOD:key=v1,v2: option values to try for one method (repeatable; several keys: "
                       "every combination). The method's other options chosen in the recipe (--recipe, or the "
                       "scenario's shipped one) hold for every candidate unless gridded or given by --opt.")] = [],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; a candidate's score is its mean.")] = "0",
    pool: TrainPoolOpt = None,
    clip_model: ClipModelOpt = None,
    clip_pretrained: ClipPretrainedOpt = None,
    epochs: EpochsOpt = None,
    iters: ItersOpt = None,
    batch_size: BatchSizeOpt = None,
    weight_decay: WeightDecayOpt = None,
    warmup: WarmupOpt = None,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    train_per_class: TrainPerClassOpt = None,
    test_per_class: TestPerClassOpt = None,
    recipe: RecipeOpt = None,
    opt: Annotated[list[str], typer.Option(
        "--opt", help="Method option key=value for every candidate (repeatable); recorded in the recipe.")] = [],
):
    """Choose each method's learning rate and key options on a validation split carved from the training
    images (never the test split), and write them with how they were chosen into a recipe file that
    `uniil train` and `uniil bench` use as defaults."""
    from .trainer.sweep import check, run_sweep, sweep_config

    settings, given = _bench_settings(out_dir, pool, clip_model, clip_pretrained, device, data_root, download, "val",
                                      epochs=epochs, iters=iters, batch_size=batch_size, weight_decay=weight_decay,
                                      warmup=warmup, precision=precision, train_per_class=train_per_class,
                                      test_per_class=test_per_class)
    command = "uniil sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    cfg = sweep_config(scenario, methods, lrs, grid, seeds, out_dir, settings, write, _recipe(recipe, scenario),
                       given, _method_options(opt), command)
    check(cfg)
    result, chosen = _run_grid(run_sweep, cfg, out_dir, clip_model, clip_pretrained)
    _print_bench(result, scenario, out_dir, "sweep")
    t = Table("method", "lr", "options", "how", title=f"chosen on validation, written to {write}")
    for name in cfg.methods:
        m = chosen.methods[name]
        t.add_row(name, f"{m.lr:g}" if m.lr is not None else "-",
                  " ".join(f"{k}={v}" for k, v in m.options.items()), m.chosen)
    out.print(t)


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its pool, runs and report.")] = Path("demo-out"),
    llm: Annotated[str, typer.Option(help="LLM for the pool (default: the embedded offline model).")] = "local",
    clip_model: Annotated[str, typer.Option("--clip-model", help="Backbone of the demo.")] = "uniil-micro",
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per step [2: a fifth of the recipe's budget].",
                                                  show_default=False)] = None,
):
    """The main job on embedded defaults, offline: an attribute pool for the synthetic world, then
    each method on the synthetic-uniil scenario, compared in one report."""
    from .attrpool.build import BuildConfig, build_pool
    from .attrpool.llm import LLMSpec
    from .attrpool.match import match_images
    from .backbones.spec import BackboneSpec
    from .data.images import dataset_images
    from .data.registry import resolve_names
    from .trainer.engine import train as run_training
    from .trainer.recipes import find_recipe, train_config
    from .trainer.report import load_runs, write_report

    from .trainer.methods import method_class
    from .typed_options import format_value

    for _, method, options, _ in DEMO_RUNS:  # the typed path refuses a bad one before the pool is built
        method_class(method).parse_options(options)
    pools = {"llm": workdir / "synthetic.duckdb", "reference": workdir / "reference.duckdb"}
    pool = pools["llm"]
    spec = BackboneSpec.from_options(clip_model, None)
    _ensure_backbone(clip_model)
    if spec.model == "uniil-micro":
        _show_backbone(spec)
    out.rule(f"uniil demo 1/3: attribute pools for the synthetic world (embedded LLM, and the reference files; "
             f"{clip_model})")
    for dataset in DEMO_DATASETS:
        cfg = BuildConfig(pool=pool, names=resolve_names(dataset), llm=LLMSpec.from_options(llm, None, None, None),
                          backbone=spec, concurrency=1)
        with RichProgress() as progress:
            _print_report(build_pool(cfg, progress))
    from importlib import resources

    from .attrpool.importer import ImportConfig, import_attributes

    for dataset in DEMO_DATASETS:
        file = Path(str(resources.files("uniil.data").joinpath(f"attributes/{dataset}.json")))
        with RichProgress(keep_finished=False) as progress:
            report = import_attributes(ImportConfig(file, pools["reference"], clip_model=clip_model,
                                                       dedupe_threshold=1.0), progress)  # every phrase as written
        out.print(f"uniil attrs import {file.name} --pool {pools['reference']} --dedupe-threshold 1: {report.phrases} phrases, "
                  f"{report.stats.get('attributes', '?')} attributes in the pool", markup=False, highlight=False)
    for name, p in pools.items():
        found = _attributes(p, None, None)
        t = Table("source", "attributes", title=f"a few classes and domains: {name} pool")
        for src in ["star", "heart", "seven", "honeycomb", "sketch", "scan"]:
            t.add_row(src, "; ".join(found.get(src, [])))
        out.print(t)

    out.rule("uniil demo 2/3: which attributes do two rendered test images call up? (uniil attrs match)")
    report = match_images(pool, dataset_images("synthetic", "test", "sketch", None, 2), top_k=3)
    for key, found in report.results:
        out.print(f"{key}: " + "; ".join(f"{m.attribute} ({m.kind}, {m.score:.2f})" for m in found))
    if clip_model == "uniil-tiny":
        out.print("uniil-tiny has random weights, so these matches are noise.")

    out.rule("uniil demo 3/3: continual learning on synthetic-uniil (uniil train), compared (uniil report)")
    runs = []
    recipe = find_recipe(None, DEMO_SCENARIO)  # each method's values chosen on validation (uniil sweep)
    for name, method, options, pool_name in DEMO_RUNS:
        run_dir = workdir / "runs" / name
        pool = pools[pool_name]
        settings = {**DEMO_SETTINGS, **({"epochs": epochs} if epochs is not None else {})}
        tcfg = train_config(DEMO_SCENARIO, method, run_dir, recipe,
                            {"pool": pool, "clip_model": clip_model, **settings,
                             "resume": (run_dir / "config.json").exists()}, dict(options))
        opts = "".join(f" --opt {k}={format_value(v)}" for k, v in options.items())
        flags = (f" --epochs {settings['epochs']} --train-per-class {settings['synthetic_train_per_class']}"
                 f" --test-per-class {settings['synthetic_test_per_class']}")
        out.print(f"uniil train --scenario {DEMO_SCENARIO} --method {method}{opts} --pool {pool} "
                  f"--clip-model {clip_model}{flags} --out {run_dir}", markup=False, highlight=False)
        with RichProgress(keep_finished=False) as progress:
            run_training(tcfg, progress, on_step=lambda s: progress.print(_step_line(s)))
        runs.append(run_dir)
    records = load_runs(runs)
    _print_runs(records)
    html = write_report(records, workdir / "report")
    out.print(f"report: {html}   |   inspect the pools: uniil attrs list --pool {pools['llm']} (or "
              f"{pools['reference']})   |   uniil attrs match --pool {pools['llm']} --dataset synthetic --limit 4 "
              "--html matches.html",
              markup=False, highlight=False)


_interrupt_hint = "interrupted; finished work (LLM answers included) is kept: rerun to continue"


def _interrupted() -> None:
    err.print(_interrupt_hint, markup=False)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="uniil", standalone_mode=False)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as exc:  # typer vendors its own click: catch its public exception types
        sys.exit(getattr(exc, "exit_code", 0))
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    except typer.TyperException as exc:  # usage errors: unknown option, missing value, ...
        if hasattr(exc, "show"):
            exc.show()
        else:
            err.print(f"error: {exc.format_message()}", markup=False)
        sys.exit(exc.exit_code)
    if rv == 130:  # typer turns Ctrl-C into an exit status of 130
        _interrupted()
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
