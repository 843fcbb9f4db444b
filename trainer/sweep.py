"""`uniil sweep`: choose each method's learning rate and its key options on a validation split,
and write them into a recipe file (trainer/recipes.py) that `uniil train` and `uniil bench` use.

Every candidate (method x learning rate x grid point) runs as a `uniil bench` entry with
`eval_split="val"`: it trains on 80% of each class's training images and is scored on the other
20%; the test split is never read. The candidate with the best mean validation Last (class-IL;
ties: Avg) over the sweep's seeds wins. The recipe records the budget every candidate ran with,
the values chosen, how (`chosen`), and every candidate's scores (`candidates`).

A sweep refines the recipe it starts from: a swept method's earlier option choices that its grid
does not name hold for every candidate (and stay in the recipe written); its learning rate is
always re-chosen from `--lrs`. To re-choose an inherited option, grid it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from ..common import atomic_write_text
from ..errors import UserError
from ..typed_options import format_value
from .bench import BenchConfig, BenchResult, MethodSummary, parse_methods, parse_seeds, run_bench, validate
from .config import TrainConfig
from .recipes import DEFAULT_FIELDS, MethodRecipe, Recipe, dump

SELECT_BY = ("last", "avg")  # validation Last, ties broken by Avg


@dataclass(frozen=True)
class Candidate:
    label: str
    method: str
    lr: float | None  # None: the method trains nothing
    options: dict  # every --opt value of the candidate: the recipe's earlier choices, then the grid point's
    point: dict = dataclasses.field(default_factory=dict)  # the grid point's values (text): what names it


@dataclass(frozen=True)
class SweepConfig:
    scenario: str
    methods: tuple[str, ...]
    lrs: tuple[float, ...]
    grids: Mapping[str, Mapping[str, tuple[str, ...]]]  # method -> option -> values (text)
    seeds: tuple[int, ...]
    out: Path
    settings: TrainConfig
    write: Path
    recipe: Recipe | None = None  # defaults and shared options come from it; its methods are what is re-chosen
    given: frozenset[str] = frozenset()
    shared_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    command: str = ""

    def candidates(self) -> list[Candidate]:
        from .methods.base import method_class

        out = []
        for method in self.methods:
            trains = method_class(method).trains
            grid = self.grids.get(method, {})
            points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
            kept = self.inherited(method)
            for lr in (self.lrs if trains else (None,)):
                for point in points:
                    parts = ([f"lr={lr:g}"] if lr is not None else []) + [f"{k}={v}" for k, v in point.items()]
                    out.append(Candidate(f"{method}@{','.join(parts)}" if parts else method, method, lr,
                                         {**kept, **point}, point))
        return out

    def inherited(self, method: str) -> dict:
        """The recipe's earlier option choices for `method` that neither this sweep's grid nor its
        `--opt` values name, nor any preset the grid tries sets (an explicit value would override it)."""
        from .methods.base import method_class

        own = self.recipe.methods.get(method) if self.recipe is not None else None
        grid = self.grids.get(method, {})
        presets = method_class(method).presets
        named = set(grid) | set(self.shared_options)
        named |= {k for p in grid.get("preset", ()) for k in presets.get(p, {})}
        return {k: v for k, v in (own.options if own is not None else {}).items() if k not in named}

    def bench(self) -> BenchConfig:
        cands = self.candidates()
        # The recipe's shared parts only: each candidate carries its method's inherited options itself,
        # and an earlier learning rate must not stand in for the one swept.
        base = dataclasses.replace(self.recipe, methods={}) if self.recipe is not None else None
        return BenchConfig(self.scenario, tuple(c.label for c in cands), self.seeds, self.out,
                           dataclasses.replace(self.settings, eval_split="val"), self.shared_options,
                           {c.label: c.options for c in cands}, {c.label: c.method for c in cands}, base,
                           self.given, {c.label: {"lr": c.lr} for c in cands if c.lr is not None})


def parse_lrs(text: str) -> tuple[float, ...]:
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            v = float(item)
        except ValueError:
            v = -1.0
        if not v > 0 or v != v or v == float("inf"):
            raise UserError(f"--lrs: {item!r} is not a learning rate; write positive numbers separated by commas, "
                            "e.g. --lrs 3e-4,1e-3,3e-3")
        values.append(v)
    if not values:
        raise UserError("--lrs: give at least one learning rate, e.g. --lrs 3e-4,1e-3,3e-3")
    if len(set(values)) < len(values):
        raise UserError("--lrs names a learning rate twice; give each once")
    return tuple(values)


def parse_grids(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, tuple[str, ...]]]:
    """`--grid METHOD:key=v1,v2` items -> {method: {key: (v1, v2)}}; keys as declared (`-` for `_`)."""
    grids: dict[str, dict[str, tuple[str, ...]]] = {}
    for item in items:
        head, sep, values = item.partition("=")
        method, colon, key = head.partition(":")
        key = key.strip().replace("-", "_")
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if not (sep and colon and method.strip() and key and vals):
            raise UserError(f"--grid {item!r}: write METHOD:key=v1,v2, e.g. --grid mage:beta=0,1")
        method = method.strip()
        if method not in methods:
            raise UserError(f"--grid {item!r}: {method} is not one of --methods ({', '.join(methods)})")
        if key in grids.get(method, {}):
            raise UserError(f"--grid names {method}:{key} twice; give its values once, separated by commas")
        if len(set(vals)) < len(vals):
            raise UserError(f"--grid {item!r} names a value twice; give each once")
        grids.setdefault(method, {})[key] = vals
    return grids


def sweep_config(scenario: str, methods: str, lrs: str, grid_items: Sequence[str], seeds: str, out: Path,
                 settings: TrainConfig, write: Path, recipe: Recipe | None, given: Sequence[str],
                 shared_options: Mapping[str, object], command: str = "") -> SweepConfig:
    names = parse_methods(methods)
    if any("=" in n for n in names):
        raise UserError("--methods: a sweep chooses values for methods, not for LABEL=METHOD variants; name methods")
    cfg = SweepConfig(scenario, names, parse_lrs(lrs), parse_grids(grid_items, names), parse_seeds(seeds), Path(out),
                      settings, Path(write), recipe, frozenset(given), dict(shared_options), command)
    if cfg.write.exists() and not cfg.write.is_file():
        raise UserError(f"--write {cfg.write} is not a file; name a recipe YAML file")
    return cfg


def check(cfg: SweepConfig) -> None:
    """Everything checkable before a run: methods, options, grid values, run directories."""
    validate(cfg.bench())


def _score(summary: MethodSummary) -> tuple[float, ...] | None:
    if len(summary.finished) < len(summary.runs) or not summary.finished:
        return None  # a candidate that failed on any seed cannot win
    return tuple(summary.stats[k].mean if summary.stats[k].mean is not None else float("-inf") for k in SELECT_BY)


def choose(cfg: SweepConfig, result: BenchResult) -> Recipe:
    """The recipe: each method's best candidate on validation, the budget, how it was chosen."""
    by_label = {s.method: s for s in result.summaries}
    cands = cfg.candidates()
    seeds = ", ".join(map(str, cfg.seeds))
    methods: dict[str, MethodRecipe] = dict(cfg.recipe.methods) if cfg.recipe is not None else {}
    table: dict[str, list[dict]] = dict((cfg.recipe.extra.get("candidates") or {})) if cfg.recipe is not None else {}
    for method in cfg.methods:
        mine = [c for c in cands if c.method == method]
        scored = [(c, _score(by_label[c.label])) for c in mine]
        table[method] = [{"lr": c.lr, "options": _typed(method, c.options),
                          "val_last": _round(by_label[c.label].stats["last"].mean),
                          "val_avg": _round(by_label[c.label].stats["avg"].mean),
                          "status": "finished" if s is not None else "failed"} for c, s in scored]
        ok = [(c, s) for c, s in scored if s is not None]
        if not ok:
            raise UserError(f"every candidate of {method} failed (see {cfg.out / 'bench.md'}); nothing to choose")
        best, _ = max(ok, key=lambda cs: cs[1])  # first of equals: the grid's order decides
        kept = cfg.inherited(method)
        if best.lr is None and not best.point:
            why = "nothing to choose: it trains no parameters"
        else:
            shown = "; ".join(f"{_shown(c)}: {_round(s[0]) if s else 'failed'}" for c, s in scored)
            why = (f"best validation Last (class-IL, {SELECT_BY[1]} breaks ties) over seed(s) {seeds} among "
                   f"{len(mine)} candidates: {shown}")
        if kept:
            why += "; kept from the recipe swept from: " + ", ".join(f"{k}={format_value(v)}" for k, v in kept.items())
        methods[method] = MethodRecipe(best.lr, _typed(method, best.options), why)
    first = result.config.run_config(result.config.methods[0], cfg.seeds[0])
    defaults = {field: getattr(first, field) for field in DEFAULT_FIELDS.values()
                if field != "lr" and getattr(first, field) is not None}
    options = {**(cfg.recipe.options if cfg.recipe is not None else {}), **cfg.shared_options}
    about = (f"Chosen by `uniil sweep` on {date.today().isoformat()}: each candidate trained on 80% of every "
             f"class's training images and scored on the other 20% (the seeded per-class carve; the test split "
             f"is never read), seed(s) {seeds}, with the defaults below for every method.")
    extra = {"command": cfg.command or None, "backbone": first.clip_model or "ViT-B-16", "candidates": table}
    return Recipe(cfg.write, cfg.scenario if not Path(cfg.scenario).suffix else Path(cfg.scenario).stem,
                  defaults, options, methods, about, {k: v for k, v in extra.items() if v is not None})


def _typed(method: str, options: Mapping[str, object]) -> dict:
    """A grid point's options as the method's parser types them (a recipe holds numbers, not text)."""
    from .methods.base import method_class

    if not options:
        return {}
    parsed = method_class(method).parse_options(options)
    return {k: getattr(parsed, k) for k in options}


def _shown(c: Candidate) -> str:
    parts = ([f"lr {c.lr:g}"] if c.lr is not None else []) + [f"{k}={v}" for k, v in c.point.items()]
    return ", ".join(parts) or "as is"


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def run_sweep(cfg: SweepConfig, progress=None, on_run=None) -> tuple[BenchResult, Recipe]:
    result = run_bench(cfg.bench(), progress, on_run)
    if result.failed and len(result.failed) == len(result.runs):
        raise UserError(f"every sweep run failed (see {cfg.out / 'bench.md'}); no recipe written")
    recipe = choose(cfg, result)
    cfg.write.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.write, "# Written by `uniil sweep`; see `about` and each method's `chosen`.\n" + dump(recipe))
    return result, recipe
