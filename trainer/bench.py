"""`uniil bench`: every method x seed of one scenario as ordinary `uniil train` runs, summarised as
mean and sample standard deviation over the seeds.

The runner knows nothing about any scenario: it takes a scenario name (a preset or a YAML file)
and the settings every run shares, and writes into the bench folder

    runs/<method>-seed<k>/   one `uniil train` run directory each (config, checkpoints, metrics.json)
    bench.json              per method: each seed's metrics, their mean and std, the per-step curve
    bench.md                a Markdown table "mean ± std" per metric, failed runs, the curve plot
    curves.png              class-IL accuracy on the steps seen so far, mean ± std over seeds
    report/                 `uniil report` of every run (trainer/report.write_report)

Runs go one after another in this process through the engine's `train()`. A rerun skips the
finished runs and resumes interrupted ones (the engine's --resume); a run directory holding a run
with another config is refused before anything runs. A run that fails is recorded with its
one-line reason and the others go on. Metric definitions: docs/methods.md#metrics.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..common import NullProgress, Progress, atomic_write_bytes, atomic_write_text
from ..errors import UserError
from . import checkpoint as ckpt
from . import engine
from .config import TrainConfig
from .recipes import Recipe
from .records import METRIC_KEYS, MetricsRecord

log = logging.getLogger(__name__)

BENCH_JSON, BENCH_MD, CURVES_PNG, RUNS_DIR, REPORT_DIR = "bench.json", "bench.md", "curves.png", "runs", "report"
# The summarised metrics: (key in bench.json, column header), in display order.
BENCH_METRICS: tuple[tuple[str, str], ...] = (
    ("last", "Last"), ("avg", "Avg"), ("avg_incremental", "Avg inc."), ("transfer", "Transfer"),
    ("forgetting", "Forgetting"), ("bwt", "BWT"), ("task_il_last", "task-IL Last"))
TRAINED, FINISHED_EARLIER, FAILED = "trained", "finished earlier", "failed"


# -- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """One bench: a scenario, the entries and seeds of its grid, and what every run shares.

    An entry is a label naming a method (`mage`), or a variant of one (`mage-noattr` -> `mage`
    in `entry_methods`, with its own options). `settings` is a TrainConfig whose scenario, method,
    seed, out, resume and method_options are set per run; `given` names the settings the user
    gave, which win over the recipe's (the other settings are TrainConfig's defaults).
    `shared_options` are `--opt` values (text or typed) for every entry, each of whose methods
    must declare them; `method_options` are one entry's, and win over the shared ones. A recipe's
    values come first for what was not given; `label_settings` are per-entry TrainConfig fields
    over everything (a sweep's learning rates)."""

    scenario: str
    methods: tuple[str, ...]  # entry labels
    seeds: tuple[int, ...]
    out: Path
    settings: TrainConfig
    shared_options: Mapping[str, object] = field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    entry_methods: Mapping[str, str] = field(default_factory=dict)  # label -> method, when they differ
    recipe: Recipe | None = None
    given: frozenset[str] = frozenset()
    label_settings: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def method(self, label: str) -> str:
        return self.entry_methods.get(label, label)

    def options(self, label: str) -> dict[str, object]:
        """The `--opt` values one entry's runs get, as given (the method's parser types them)."""
        from_recipe = self.recipe.method_options(self.method(label)) if self.recipe is not None else {}
        return {**from_recipe, **self.shared_options, **self.method_options.get(label, {})}

    def run_dir(self, label: str, seed: int) -> Path:
        return self.out / RUNS_DIR / f"{label}-seed{seed}"

    def run_config(self, label: str, seed: int) -> TrainConfig:
        """The `uniil train` config of one cell of the grid (resuming when its directory holds a run)."""
        out = self.run_dir(label, seed)
        settings = self.settings
        if self.recipe is not None:
            from_recipe = {k: v for k, v in self.recipe.settings(self.method(label)).items() if k not in self.given}
            settings = dataclasses.replace(settings, **from_recipe, recipe=str(self.recipe.path))
        settings = dataclasses.replace(settings, **self.label_settings.get(label, {}))
        return dataclasses.replace(settings, scenario=self.scenario, method=self.method(label), seed=seed, out=out,
                                   resume=(out / ckpt.CONFIG).is_file(), method_options=self.options(label))

    @property
    def grid(self) -> list[tuple[str, int]]:
        return [(m, s) for m in self.methods for s in self.seeds]


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """`a,b,c` -> ("a", "b", "c"): at least one, none twice (existence is checked by `validate`).
    An item may be `label=method`: a variant of a method under its own label (see `entry_methods`)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise UserError("--methods: name at least one method, e.g. --methods zeroshot,finetune (uniil methods lists them)")
    labels = [n.partition("=")[0].strip() for n in names]
    for n, label in zip(names, labels):
        method = n.partition("=")[2].strip()
        if not label or ("=" in n and not method) or not all(c.isalnum() or c in "-_.@" for c in label):
            raise UserError(f"--methods: {n!r} is not METHOD or LABEL=METHOD (a label of letters, digits, - _ . @), "
                            "e.g. --methods mage,mage-noattr=mage")
    _once(labels, "--methods", "method or label")
    return tuple(names)


def entry_methods(items: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """parse_methods' items -> (labels, {label: method} for the `label=method` ones)."""
    labels, methods = [], {}
    for item in items:
        label, sep, method = item.partition("=")
        labels.append(label.strip())
        if sep:
            methods[label.strip()] = method.strip()
    return tuple(labels), methods


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
    """`0,1,2` -> (0, 1, 2): whole numbers >= 0, at least one, none twice."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    seeds = []
    for item in items:
        if isinstance(item, str) and item == "":
            continue
        try:
            seed = int(item) if not isinstance(item, (bool, float)) else None
        except ValueError:
            seed = None
        if seed is None or seed < 0:
            raise UserError(f"--seeds: {item!r} is not a seed; write whole numbers >= 0 separated by commas, "
                            "e.g. --seeds 0,1,2")
        seeds.append(seed)
    if not seeds:
        raise UserError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    _once(seeds, "--seeds", "seed")
    return tuple(seeds)


def _once(items: list, flag: str, what: str) -> None:
    twice = sorted({x for x in items if items.count(x) > 1})
    if twice:
        raise UserError(f"{flag} names {', '.join(map(str, twice))} twice; give each {what} once")


def parse_option_items(items: Sequence[str], methods: Sequence[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """`--opt` items -> (options for every method, {method: its own options}), as text.
    `key=value` applies to every method (and must be one of each method's options);
    `method:key=value` to that method only, and wins over a plain `key=value`. Keys are written
    as the options are declared (`-` may stand for `_`)."""
    plain: dict[str, str] = {}
    targeted: dict[str, dict[str, str]] = {}
    for item in items:
        head, sep, value = item.partition("=")
        method, colon, key = head.rpartition(":")
        key = key.strip().replace("-", "_")
        if not sep or not key or (colon and not method.strip()):
            raise UserError(f"--opt {item!r}: write key=value (every method) or method:key=value (one method), "
                            "e.g. --opt finetune:adapter_rank=32")
        if colon:
            method = method.strip()
            if method not in methods:
                raise UserError(f"--opt {item!r}: {method} is not one of --methods ({', '.join(methods)})")
            targeted.setdefault(method, {})[key] = value
        else:
            plain[key] = value
    return plain, targeted


def bench_config(scenario: str, methods: str | Sequence[str], seeds: str | Sequence[int], out: Path,
                 settings: TrainConfig, opt_items: Sequence[str] = (), recipe: Recipe | None = None,
                 given: Sequence[str] = ()) -> BenchConfig:
    """A BenchConfig from command-line text (`a,b=c`, `0,1`, `--opt` items); each part is a one-line
    UserError when malformed. `validate` checks the rest."""
    labels, variants = entry_methods(parse_methods(methods))
    shared, own = parse_option_items(opt_items, labels)
    return BenchConfig(scenario, labels, parse_seeds(seeds), Path(out), settings, shared, own, variants, recipe,
                       frozenset(given))


def validate(cfg: BenchConfig) -> dict[str, object]:
    """Everything that can be checked before a run starts, so a mistake costs nothing and writes
    nothing: the scenario, the shared settings, each method and its options (a plain `--opt` key
    every method must have), `--pool` for the methods that need one, and that no run directory
    holds a run with another config. Returns each method's typed options."""
    from ..backbones.spec import BackboneSpec
    from .methods.base import method_class
    from ..typed_options import option_specs
    from .scenario import load_scenario

    load_scenario(cfg.scenario)
    dataclasses.replace(cfg.settings, scenario=cfg.scenario).validate()
    BackboneSpec.from_options(cfg.settings.clip_model, cfg.settings.clip_pretrained)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"--out {cfg.out} exists and is not a directory; choose another --out")
    if cfg.settings.pool is not None and not Path(cfg.settings.pool).is_file():
        raise UserError(f"--pool {cfg.settings.pool} does not exist; build it with `uniil attrs build`")
    typed = {}
    for label in cfg.methods:
        method = cfg.method(label)
        cls = method_class(method)
        known = [s.name for s in option_specs(cls.Options, cls.presets)]
        lacking = [k for k in cfg.shared_options if k not in known]
        if lacking:  # a plain --opt key=value applies to every method: say how to aim it at one
            raise UserError(f"--opt {lacking[0]}=...: method {method} has no option {lacking[0]} (its options: "
                            f"{', '.join(known)}); write METHOD:{lacking[0]}=VALUE to set it for one method")
        typed[label] = opts = cls.parse_options(cfg.options(label))
        cfg.run_config(label, cfg.seeds[0]).validate()
        if cfg.settings.pool is None and cls.requires_pool(opts):
            raise UserError(f"method {label} needs an attribute pool: pass --pool P.duckdb "
                            "(build one with `uniil attrs build`), or leave it out of --methods")
    if cfg.settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {cfg.settings.device}: CUDA is not available here; use --device cpu")
    for method, seed in cfg.grid:
        _check_run_dir(cfg, method, seed, typed[method])
    return typed


def _check_run_dir(cfg: BenchConfig, method: str, seed: int, opts) -> None:
    """A run directory is new, or holds this very run (finished or to resume): never another run."""
    from .methods.base import method_class
    from ..typed_options import options_json

    run = cfg.run_config(method, seed)
    method = run.method  # a variant's label -> its method
    if not run.out.exists():
        return
    if not run.out.is_dir():
        raise UserError(f"{run.out} is not a directory; move it away or choose another --out")
    if not (run.out / ckpt.CONFIG).is_file():
        if any(run.out.iterdir()):
            raise UserError(f"{run.out} is not a uniil run directory (no {ckpt.CONFIG}); move it away or "
                            "choose another --out")
        return
    resolved = dataclasses.replace(run, method_options=options_json(opts))
    stored = ckpt.read_json(run.out / ckpt.CONFIG).get("identity", {})
    identity = resolved.identity_against(stored, method_class(method).options_record, lambda: "an earlier uniil")
    differ = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
    if differ:
        shown = ", ".join(f"{k} ({stored.get(k)!r} -> {identity.get(k)!r})" for k in differ[:3])
        raise UserError(f"{run.out} holds a run with a different config: {shown}; rerun with its options, "
                        "or choose another --out")


# -- results ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunOutcome:
    """One cell of the grid: trained now, finished by an earlier bench, or failed (with why)."""

    method: str
    seed: int
    path: Path
    status: str  # TRAINED, FINISHED_EARLIER or FAILED
    reason: str | None = None  # one line, for a failed run
    record: MetricsRecord | None = None  # the finished run's metrics

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def metrics(self) -> dict[str, float | None]:
        """The summarised metrics of a finished run (None for a failed one)."""
        r = self.record
        if r is None or self.failed:
            return {k: None for k, _ in BENCH_METRICS}
        out = {k: getattr(r.class_il, k) for k in METRIC_KEYS}
        out["task_il_last"] = r.task_il.last if r.task_il else None
        return out


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1; None with fewer than two values) over seeds."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "Stat":
        vals = np.array([v for v in values if v is not None], dtype=np.float64)
        if vals.size == 0:
            return cls(None, None, 0)
        return cls(float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else None, int(vals.size))

    def text(self) -> str:
        """ "40.1 ± 0.3", "40.1" (one seed) or "-" (no value)."""
        if self.mean is None:
            return "-"
        return f"{self.mean:.1f}" + (f" ± {self.std:.1f}" if self.std is not None else "")


@dataclass(frozen=True)
class MethodSummary:
    method: str  # the entry's label
    options: dict  # the resolved, typed options every run of the method used
    runs: tuple[RunOutcome, ...]  # one per seed, in --seeds order
    stats: dict[str, Stat]  # key of BENCH_METRICS -> over the finished seeds
    curve_mean: tuple[float, ...]  # per step: class-IL accuracy on the steps seen so far
    curve_std: tuple[float | None, ...]
    settings: dict = field(default_factory=dict)  # the entry's own training settings (method, lr, ...)

    @property
    def finished(self) -> list[RunOutcome]:
        return [r for r in self.runs if not r.failed]

    def to_json(self, root: Path) -> dict:
        return {**self.settings, "options": self.options,
                "seeds": {str(r.seed): {"status": r.status, "reason": r.reason, "path": _rel(r.path, root),
                                        "metrics": r.metrics()} for r in self.runs},
                "n": len(self.finished),
                "mean": {k: s.mean for k, s in self.stats.items()},
                "std": {k: s.std for k, s in self.stats.items()},
                "curve": {"mean": list(self.curve_mean), "std": list(self.curve_std)}}


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    summaries: tuple[MethodSummary, ...]

    @property
    def runs(self) -> list[RunOutcome]:
        return [r for s in self.summaries for r in s.runs]

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.failed]

    def to_json(self) -> dict:
        cfg = self.config
        first = cfg.run_config(cfg.methods[0], cfg.seeds[0])
        shared = {k: v for k, v in first.as_json().items()
                  if k not in ("scenario", "seed", "out", "resume", "method_options", *OWN_SETTINGS)}
        return {"scenario": cfg.scenario, "methods": list(cfg.methods), "seeds": list(cfg.seeds),
                "settings": shared, "note": "std: sample standard deviation over the finished seeds (n - 1); null with one",
                "results": {s.method: s.to_json(cfg.out) for s in self.summaries},
                "failed": [{"method": r.method, "seed": r.seed, "reason": r.reason} for r in self.failed]}


# Settings that may differ between a bench's entries (a recipe's learning rates, a sweep's grid).
OWN_SETTINGS = ("method", "lr", "epochs", "iters", "batch_size", "warmup", "weight_decay")


def _own_settings(cfg: BenchConfig, label: str) -> dict:
    run = cfg.run_config(label, cfg.seeds[0])
    return {k: getattr(run, k) for k in OWN_SETTINGS}


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def seen_curve(record: MetricsRecord) -> list[float]:
    """Class-IL accuracy on the union of the test sets of steps <= j, for each finished step j
    (size-weighted; its mean over j is Avg inc., docs/methods.md#metrics)."""
    rows = record.class_il.accuracy_matrix[:record.finished_steps]
    sizes = record.test_sizes or []
    w = np.array(sizes if len(sizes) == record.total_steps and all(n > 0 for n in sizes)
                 else [1] * record.total_steps, dtype=np.float64)
    out = []
    for j, row in enumerate(rows):
        a = np.array(row[:j + 1], dtype=np.float64)
        keep = ~np.isnan(a)
        out.append(float((a[keep] * w[:j + 1][keep]).sum() / w[:j + 1][keep].sum()) if keep.any() else math.nan)
    return out


def summarise(method: str, options: dict, runs: Sequence[RunOutcome], settings: dict | None = None) -> MethodSummary:
    finished = [r for r in runs if not r.failed]
    stats = {k: Stat.of([r.metrics()[k] for r in finished]) for k, _ in BENCH_METRICS}
    curves = [seen_curve(r.record) for r in finished if r.record is not None]
    mean: list[float] = []
    std: list[float | None] = []
    for j in range(min((len(c) for c in curves), default=0)):
        s = Stat.of([c[j] for c in curves])
        mean.append(s.mean)
        std.append(s.std)
    return MethodSummary(method, options, tuple(runs), stats, tuple(mean), tuple(std), dict(settings or {}))


# -- running ------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else "(no message)"
    return first if isinstance(exc, UserError) else f"{exc.__class__.__name__}: {first}"


def _run_one(cfg: BenchConfig, method: str, seed: int, progress: Progress | None, on_step) -> RunOutcome:
    run = cfg.run_config(method, seed)
    metrics = run.out / ckpt.METRICS
    try:
        if run.resume and metrics.is_file():
            record = MetricsRecord.load(metrics)
            if not record.partial:
                log.info("%s is finished: skipped", run.out)
                return RunOutcome(method, seed, run.out, FINISHED_EARLIER, record=record)
        log.info("%s %s seed %d -> %s", "resuming" if run.resume else "training", method, seed, run.out)
        record = engine.train(run, progress, on_step)
        return RunOutcome(method, seed, run.out, TRAINED, record=record)
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the others go on; Ctrl-C is not caught
        reason = _one_line(exc)
        log.warning("%s seed %d failed: %s", method, seed, reason)
        log.debug("%s seed %d failed", method, seed, exc_info=not isinstance(exc, UserError))
        return RunOutcome(method, seed, run.out, FAILED, reason=reason)


def run_bench(cfg: BenchConfig, progress: Progress | None = None,
              on_run: Callable[[RunOutcome], None] | None = None, on_step=None) -> BenchResult:
    """Validate (nothing is written on a mistake), run every method x seed in order, then write
    bench.json, curves.png, bench.md and report/. A failed run does not stop the others: the
    result lists it (`BenchResult.failed`) and the caller decides the exit status."""
    from ..typed_options import options_json

    typed = validate(cfg)
    bar = progress or NullProgress()
    grid = cfg.grid
    bar.start("bench", f"bench: {len(cfg.methods)} method(s) x {len(cfg.seeds)} seed(s)", len(grid))
    outcomes: dict[tuple[str, int], RunOutcome] = {}
    for method, seed in grid:
        outcome = _run_one(cfg, method, seed, progress, on_step)
        outcomes[(method, seed)] = outcome
        bar.advance("bench", 1)
        if on_run is not None:
            on_run(outcome)
    bar.stop("bench")
    summaries = tuple(summarise(m, options_json(typed[m]), [outcomes[(m, s)] for s in cfg.seeds], _own_settings(cfg, m))
                      for m in cfg.methods)
    result = BenchResult(cfg, summaries)
    write_outputs(result)
    return result


# -- outputs ------------------------------------------------------------------------------------

def summary_rows(result: BenchResult) -> list[list[str]]:
    """One row per method: method, seeds finished (of all), then "mean ± std" per BENCH_METRICS."""
    rows = []
    for s in result.summaries:
        seeds = f"{len(s.finished)}/{len(s.runs)}" + (" (failed: " + ", ".join(str(r.seed) for r in s.runs
                                                                                 if r.failed) + ")"
                                                      if len(s.finished) < len(s.runs) else "")
        rows.append([s.method, seeds, *(s.stats[k].text() for k, _ in BENCH_METRICS)])
    return rows


SUMMARY_HEADERS: tuple[str, ...] = ("method", "seeds", *(h for _, h in BENCH_METRICS))


def failed_lines(result: BenchResult) -> list[str]:
    return [f"{r.method} seed {r.seed} ({_rel(r.path, result.config.out)}): {r.reason}" for r in result.failed]


def markdown(result: BenchResult, with_curves: bool) -> str:
    cfg = result.config
    lines = [f"# uniil bench: {cfg.scenario}", "",
             f"{len(cfg.methods)} method(s) x {len(cfg.seeds)} seed(s) ({', '.join(map(str, cfg.seeds))}); "
             "accuracy in %, class-IL (task-IL Last over each dataset's own classes); mean ± sample std over "
             "the seeds that finished (n - 1; no std with one seed). Runs: `runs/<method>-seed<k>/`; "
             "every run's report: `report/report.html`.", "",
             "| " + " | ".join(SUMMARY_HEADERS) + " |", "|" + "---|" * len(SUMMARY_HEADERS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in summary_rows(result)]
    failed = failed_lines(result)
    lines += ["", "Failed runs: " + ("none." if not failed else f"{len(failed)} (rerun the same command to retry them)")]
    lines += [f"- {line}" for line in failed]
    if with_curves:
        lines += ["", "Class-IL accuracy on the test sets of the steps seen so far, after each step "
                      "(mean ± std over seeds):", "", f"![per-step accuracy, mean ± std over seeds]({CURVES_PNG})"]
    return "\n".join(lines) + "\n"


def curves_png(result: BenchResult) -> bytes | None:
    """One line per method (mean over its finished seeds) with a band of ± one std; None when no
    run finished."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = [s for s in result.summaries if s.curve_mean]
    if not drawn:
        return None
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    markers = "osD^v<>pPX*h"
    for k, s in enumerate(drawn):
        xs = np.arange(1, len(s.curve_mean) + 1)
        mean = np.array(s.curve_mean, dtype=np.float64)
        std = np.array([v if v is not None else 0.0 for v in s.curve_std], dtype=np.float64)
        line, = ax.plot(xs, mean, marker=markers[k % len(markers)], label=f"{s.method} (n={len(s.finished)})")
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    first = next(r.record for s in drawn for r in s.finished if r.record is not None)
    multi = len(first.datasets) > 1
    labels = [st.label(k, multi) for k, st in enumerate(first.steps)]
    ticks = list(range(1, len(labels) + 1))
    long = max(len(t) for t in labels) > 3
    ax.set_xticks(ticks, labels, rotation=30 if long else 0, ha="right" if long else "center", fontsize=8)
    ax.set_xlim(0.7, len(ticks) + 0.3)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_xlabel("after training step j")
    ax.set_ylabel("class-IL accuracy on steps seen so far (%)")
    ax.set_title(f"{result.config.scenario}: mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def write_outputs(result: BenchResult) -> None:
    """bench.json, curves.png (when a run finished), bench.md and report/ (every run with a
    finished step), each file written atomically."""
    from .report import load_runs, write_report

    out = result.config.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / BENCH_JSON, json.dumps(result.to_json(), indent=1, ensure_ascii=False) + "\n")
    png = curves_png(result)
    if png is not None:
        atomic_write_bytes(out / CURVES_PNG, png)
    else:
        (out / CURVES_PNG).unlink(missing_ok=True)  # an earlier bench's plot would not match this table
    atomic_write_text(out / BENCH_MD, markdown(result, png is not None))
    reported = [r.path for r in result.runs if (r.path / ckpt.METRICS).is_file()]
    if reported:
        write_report(load_runs(reported), out / REPORT_DIR)
    log.info("wrote %s, %s and %s", out / BENCH_JSON, out / BENCH_MD, out / REPORT_DIR)
