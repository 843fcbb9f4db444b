"""`uniil report`: compare finished (or interrupted) training runs.

A run directory is the `--out` of `uniil train`; its `metrics.json` holds the accuracy matrix and
the metrics of docs/methods.md#metrics. This module reads run directories (`load_run`), turns them
into one comparison row each (`comparison_rows`, printed by the CLI), and writes a report folder
(`write_report`): one heatmap PNG per run, one PNG of accuracy curves comparing every run, and a
self-contained `report.html` embedding them (base64, viewable offline as one file).

matplotlib is imported inside `write_report` only, so importing this module stays light.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..common import atomic_write_bytes
from ..errors import UserError
from .records import METRICS_FILE, METRIC_KEYS, Metrics, MetricsRecord

log = logging.getLogger(__name__)


# The comparison table: (row key, column header), in display order.
COLUMNS: list[tuple[str, str]] = [
    ("name", "run"), ("method", "method"), ("scenario", "scenario"), ("backbone", "backbone"),
    ("steps", "steps"), ("last", "Last"), ("avg", "Avg (MTIL)"), ("avg_incremental", "Avg inc. (CIL)"),
    ("transfer", "Transfer"), ("forgetting", "Forgetting"), ("bwt", "BWT"),
    ("task_il_last", "Task-IL Last"), ("task_il_avg", "Task-IL Avg"),
]
_TEXT_KEYS = {"name", "method", "scenario", "backbone", "steps"}


@dataclass
class RunRecord(MetricsRecord):
    """A run directory's metrics record, and where it was read from."""

    path: Path = Path(".")
    name: str = ""


# -- loading ----------------------------------------------------------------------------------

def load_run(run_dir: Path) -> RunRecord:
    """Read one run directory. A missing directory, one without metrics.json, or a corrupt
    metrics.json is a one-line UserError."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the --out of `uniil train`")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        if (run_dir / "config.json").is_file():  # `uniil train` started here but finished no step yet
            raise UserError(f"{run_dir} has no finished training step yet (no {METRICS_FILE}); "
                            f"resume it with `uniil train` or wait for its first step")
        raise UserError(f"{run_dir} is not a uniil run directory (no {METRICS_FILE}); pass the --out of `uniil train`")
    record = MetricsRecord.load(path)
    return RunRecord(**vars(record), path=run_dir.resolve(), name=run_dir.resolve().name)


def load_runs(run_dirs) -> list[RunRecord]:
    return [load_run(Path(d)) for d in run_dirs]


# -- the comparison table ---------------------------------------------------------------------

def format_metric(v) -> str:
    """"-" for a missing metric, one decimal otherwise."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}"


def comparison_rows(runs: list[RunRecord]) -> list[dict]:
    """One dict per run, keys as in COLUMNS plus finished_steps, total_steps and partial.
    Metrics are raw floats or None (format them with `format_metric`)."""
    rows = []
    for r in runs:
        row = {"name": r.name, "method": r.method, "scenario": r.scenario, "backbone": r.backbone,
               "steps": f"{r.finished_steps}/{r.total_steps}" + (" (partial)" if r.partial else ""),
               "finished_steps": r.finished_steps, "total_steps": r.total_steps, "partial": r.partial}
        row.update({k: getattr(r.class_il, k) for k in METRIC_KEYS})
        row["task_il_last"] = r.task_il.last if r.task_il else None
        row["task_il_avg"] = r.task_il.avg if r.task_il else None
        rows.append(row)
    return rows


def format_row(row: dict) -> list[str]:
    """A comparison row's cells as text, in COLUMNS order (what the CLI's table prints)."""
    return [str(row[k]) if k in _TEXT_KEYS else format_metric(row[k]) for k, _ in COLUMNS]


# -- figures ----------------------------------------------------------------------------------

def _seen_accuracy(acc: list[float], sizes: list[int], j: int) -> float:
    """Accuracy on the union of the test sets of steps <= j (size-weighted; equal weights when
    the sizes are unknown). NaN entries are left out."""
    w = sizes if len(sizes) == len(acc) and all(n > 0 for n in sizes) else [1] * len(acc)
    pairs = [(a, n) for a, n in zip(acc[:j + 1], w[:j + 1]) if not math.isnan(a)]
    total = sum(n for _, n in pairs)
    return sum(a * n for a, n in pairs) / total if total else math.nan


def _all_accuracy(acc: list[float]) -> float:
    vals = [a for a in acc if not math.isnan(a)]
    return sum(vals) / len(vals) if vals else math.nan


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _heatmap_axes(ax, run: RunRecord, m: Metrics, title: str) -> object:
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    t = run.total_steps
    grid = np.full((t, t), np.nan)
    for j, row in enumerate(m.accuracy_matrix[:run.finished_steps]):
        grid[j] = row
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="equal")
    font = 9 if t <= 8 else 7 if t <= 14 else 5
    for j in range(t):
        for i in range(t):
            if j >= run.finished_steps:  # the run stopped before this step: a grey row
                if i == 0:
                    ax.text((t - 1) / 2, j, "not run", ha="center", va="center", fontsize=font, color="#777777")
                continue
            if i > j:  # future step: not yet trained (zero-shot / transfer); hatched, grey italic text
                ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, facecolor=(1, 1, 1, 0.55),
                                       edgecolor="#999999", hatch="///", linewidth=0))
            v = grid[j, i]
            if math.isnan(v) or t > 25:
                continue
            if i > j:
                color, style = "#444444", "italic"
            else:
                color, style = ("white" if v < 60 else "black"), "normal"
            ax.text(i, j, f"{v:.1f}", ha="center", va="center", fontsize=font, color=color, fontstyle=style)
    multi = len(run.datasets) > 1
    labels = [s.label(k, multi) for k, s in enumerate(run.steps)]
    ax.set_xticks(range(t), labels, rotation=40, ha="right", fontsize=max(font, 7))
    ax.set_yticks(range(t), labels, fontsize=max(font, 7))
    ax.set_xlabel("test set of step i")
    ax.set_ylabel("after training step j")
    ax.set_title(title, fontsize=10)
    return image


def heatmap_png(run: RunRecord) -> bytes:
    """The run's accuracy matrix (class-IL, and task-IL beside it when recorded) as a PNG."""
    from matplotlib.figure import Figure

    panels = [("class-IL", run.class_il)] + ([("task-IL", run.task_il)] if run.task_il else [])
    side = min(14.0, max(4.5, 0.75 * run.total_steps + 2.5))
    fig = Figure(figsize=(side * len(panels) + 1, side), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, m) in zip(axes, panels):
        image = _heatmap_axes(ax, run, m, f"{kind} accuracy (%)")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="accuracy (%)")
    status = f"partial: {run.finished_steps}/{run.total_steps} steps" if run.partial else f"{run.total_steps} steps"
    fig.suptitle(f"{run.name}: {run.method} on {run.scenario} ({status}); hatched = step not yet trained",
                 fontsize=10)
    return _png(fig)


def curves_png(runs: list[RunRecord]) -> bytes:
    """Per-step accuracy curves of every run, class-IL. Left: accuracy on the union of the test sets
    seen so far (steps <= j, size-weighted; its mean over j is "Avg inc."). Right: mean accuracy over
    every step's test set, future ones included (its final point is "Last")."""
    from matplotlib.figure import Figure

    scenarios = list(dict.fromkeys(r.scenario for r in runs))
    mixed = len(scenarios) > 1
    t_max = max(r.total_steps for r in runs)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    markers = "osD^v<>pPX*h"
    for k, r in enumerate(runs):
        rows = r.class_il.accuracy_matrix[:r.finished_steps]
        xs = list(range(1, len(rows) + 1))
        label = f"{r.name} ({r.method}" + (f", {r.scenario})" if mixed else ")") + (" [partial]" if r.partial else "")
        style = dict(marker=markers[k % len(markers)], linestyle="--" if r.partial else "-", label=label)
        left.plot(xs, [_seen_accuracy(row, r.test_sizes or [], j) for j, row in enumerate(rows)], **style)
        right.plot(xs, [_all_accuracy(row) for row in rows], **style)
    ticks = list(range(1, t_max + 1))
    if not mixed and len({r.total_steps for r in runs}) == 1:
        multi = len(runs[0].datasets) > 1
        tick_labels = [s.label(k, multi) for k, s in enumerate(runs[0].steps)]
    else:
        tick_labels = [str(x) for x in ticks]
    for ax, title in ((left, "accuracy on the test sets of steps seen so far"),
                      (right, "mean accuracy over all steps' test sets (incl. future)")):
        ax.set_xticks(ticks, tick_labels, rotation=30 if len(tick_labels[0]) > 3 else 0, ha="right"
                      if len(tick_labels[0]) > 3 else "center", fontsize=8)
        ax.set_xlim(0.7, t_max + 0.3)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_xlabel("after training step j")
        ax.set_title(title, fontsize=10)
    left.set_ylabel("class-IL accuracy (%)")
    right.legend(fontsize=8, loc="best")
    fig.suptitle("Per-step accuracy" + (f" - different scenarios ({', '.join(scenarios)}): step j is not the same "
                                        "data across runs" if mixed else f" on {scenarios[0]}"), fontsize=10)
    return _png(fig)


# -- the report folder ------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out.append((key, text if len(text) <= 300 else text[:297] + "..."))
    return out


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222;max-width:1400px}
table{border-collapse:collapse;background:#fff;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 9px;font-size:14px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.partial td{color:#8a5a00;background:#fff8e6}
.run{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px;margin:18px 0}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.note{color:#666;font-size:13px}
details table td{font-size:12px;font-family:ui-monospace,monospace;word-break:break-all}
"""


def _img(png: bytes, alt: str, cls: str) -> str:
    return (f"<img class='{cls}' alt='{html.escape(alt, quote=True)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")


def _table_html(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = []
    for row in rows:
        cells = "".join(
            f"<td class='{'text' if k in _TEXT_KEYS else 'num'}'>{html.escape(c)}</td>"
            for (k, _), c in zip(COLUMNS, format_row(row)))
        body.append(f"<tr class='{'partial' if row['partial'] else 'complete'}'>{cells}</tr>")
    return f"<table id='comparison'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _run_html(run: RunRecord, png: bytes, anchor: str) -> str:
    e = html.escape
    status = (f"<b>partial</b>: {run.finished_steps} of {run.total_steps} steps finished" if run.partial
              else f"complete: {run.total_steps} steps")
    train = sum(x for x in run.timings.train_s if isinstance(x, (int, float)))
    evals = sum(x for x in run.timings.eval_s if isinstance(x, (int, float)))
    steps = "".join(f"<tr><td>{k + 1}</td><td>{e(s.kind)}</td><td>{e(s.dataset)}</td><td>{e(s.domain)}</td>"
                    f"<td>{len(s.classes)}</td><td class='num'>{run.test_sizes[k] if k < len(run.test_sizes or []) else '-'}"
                    f"</td></tr>" for k, s in enumerate(run.steps))
    config = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _flatten(run.config)) \
        or "<tr><td colspan='2'>(none recorded)</td></tr>"
    versions = ", ".join(f"{e(str(k))} {e(str(v))}" for k, v in run.versions.items()) or "-"
    return (f"<section class='run' id='{anchor}'><h2>{e(run.name)}</h2>"
            f"<p><code>{e(str(run.path))}</code><br>{e(run.method)} on {e(run.scenario)}, backbone "
            f"{e(run.backbone)}, seed {e(str(run.seed))}; {status}; train {train:.1f} s, eval {evals:.1f} s</p>"
            + _img(png, f"accuracy matrix of {run.name}", "matrix")
            + "<details><summary>steps</summary><table><tr><th>step</th><th>kind</th><th>dataset</th>"
            f"<th>domain</th><th>classes</th><th>test images</th></tr>{steps}</table></details>"
            f"<details open><summary>config</summary><table class='config'>{config}</table></details>"
            f"<p class='note'>versions: {versions}</p></section>")


def write_report(runs: list[RunRecord], out_dir: Path) -> Path:
    """Write `curves.png`, one `matrix-<n>-<run>.png` per run and a self-contained `report.html`
    (PNGs inlined) into out_dir; returns the HTML's path. Every file is written atomically."""
    if not runs:
        raise UserError("no runs to report on; pass one or more run directories")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("`uniil report` needs matplotlib: pip install matplotlib") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"report folder {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    curves = curves_png(runs)
    atomic_write_bytes(out_dir / "curves.png", curves)
    sections = []
    for n, run in enumerate(runs, 1):
        png = heatmap_png(run)
        name = f"matrix-{n}-{_slug(run.name)}.png"
        atomic_write_bytes(out_dir / name, png)
        sections.append(_run_html(run, png, f"run-{n}"))
        log.info("wrote %s", out_dir / name)

    rows = comparison_rows(runs)
    scenarios = list(dict.fromkeys(r.scenario for r in runs))
    mixed = ""
    if len(scenarios) > 1:
        mixed = (f"<p class='note'>These runs come from {len(scenarios)} different scenarios "
                 f"({html.escape(', '.join(scenarios))}): compare their numbers with care.</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>uniil report</title>"
            f"<style>{_STYLE}</style></head><body><h1>uniil report: {len(runs)} run(s)</h1>{mixed}"
            "<h2>Comparison</h2><p class='note'>Class-IL accuracy in percent (docs/methods.md, Metrics); "
            "task-IL when the scenario records it; '-' = not available (partial run or a single step).</p>"
            + _table_html(rows)
            + "<h2>Per-step accuracy</h2><p class='note'>Left: accuracy on the union of the test sets of the steps "
            "trained so far (its mean is Avg inc.). Right: mean accuracy over every step's test set, future steps "
            "included (its last point is Last). Dashed lines: partial runs.</p>"
            + _img(curves, "per-step accuracy curves", "curves")
            + "".join(sections)
            # Records how many images decoded, so a headless browser (and the tests) can tell.
            + "<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
            "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script>"
            "</body></html>")
    out = out_dir / "report.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    log.info("wrote %s", out)
    return out
