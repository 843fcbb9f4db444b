"""`uniil report`'s library: reading run directories, the comparison rows, and the report folder
(PNGs + one self-contained HTML page), including how headless Chromium shows the page."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from browser import chromium
from uniil.errors import UserError
from uniil.trainer import metrics
from uniil.trainer.report import (COLUMNS, comparison_rows, format_metric, format_row, load_run, load_runs,
                                  write_report)

METRIC_KEYS = ("last", "avg", "avg_incremental", "transfer", "forgetting", "bwt")
STEPS = [{"dataset": "synthetic", "domain": d, "kind": k, "classes": c} for d, k, c in [
    ("photo", "base", ["circle", "square"]), ("photo", "class", ["star", "ring"]),
    ("sketch", "domain", ["circle", "square", "star", "ring"]), ("cartoon", "class+domain", ["cross"])]]
SIZES = [80, 80, 160, 40]
CLASS_IL = [[91.25, 12.5, 30.0, 0.0], [60.0, 88.75, 41.25, 5.0], [55.0, 70.0, 86.875, 2.5], [50.0, 62.5, 80.0, 95.0]]
TASK_IL = [[98.75, 50.0, 70.0, 100.0], [96.25, 97.5, 72.5, 100.0], [95.0, 96.25, 99.375, 100.0],
           [93.75, 95.0, 98.125, 100.0]]


def metrics_json(method="finetune", scenario="synthetic-uniil", task_il=True, finished=4, **extra) -> dict:
    """metrics.json as the trainer writes it; `finished` < 4 gives an interrupted run."""
    data = {"scenario": scenario, "method": method, "backbone": "uniil-tiny@seed0", "seed": 0, "steps": STEPS,
            "test_sizes": SIZES, "finished_steps": finished,
            "timings": {"train_s": [1.5] * finished, "eval_s": [0.25] * finished},
            "config": {"lr": 1e-3, "epochs": 2, "method": {"name": method, "lambda": 0.5}},
            "versions": {"uniil": "0.1.0", "torch": "2.13.0"}}
    if finished == len(STEPS):
        data.update(metrics.summarize(CLASS_IL, SIZES))
        data["task_il"] = metrics.summarize(TASK_IL, SIZES) if task_il else None
    else:
        data.update({"accuracy_matrix": CLASS_IL[:finished], **{k: None for k in METRIC_KEYS}})
        data["task_il"] = {"accuracy_matrix": TASK_IL[:finished], **{k: None for k in METRIC_KEYS}} if task_il else None
    data.update(extra)
    return data


def make_run(root: Path, name: str, data: dict | str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return run


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """Complete with task-IL, complete class-IL only, partial (2 of 4 steps) and partial before any step."""
    root = tmp_path / "runs"
    return {"ft-taskil": make_run(root, "ft-taskil", metrics_json()),
            "lwf-classil": make_run(root, "lwf-classil", metrics_json("lwf", task_il=False)),
            "zscl-partial": make_run(root, "zscl-partial", metrics_json("zscl", finished=2)),
            "ewc-empty": make_run(root, "ewc-empty", metrics_json("ewc", task_il=False, finished=0, test_sizes=None,
                                                             statistics=[]))}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


# -- load_run and the rows --------------------------------------------------------------------

def test_load_run_reads_every_field(runs):
    r = load_run(runs["ft-taskil"])
    assert (r.name, r.method, r.scenario, r.backbone, r.seed) == ("ft-taskil", "finetune", "synthetic-uniil",
                                                                  "uniil-tiny@seed0", 0)
    assert (r.finished_steps, r.total_steps, r.partial) == (4, 4, False)
    assert [(s.dataset, s.domain, s.kind, list(s.classes)) for s in r.steps] == [
        (s["dataset"], s["domain"], s["kind"], s["classes"]) for s in STEPS]
    assert r.test_sizes == SIZES and r.class_il.accuracy_matrix == CLASS_IL
    assert r.task_il is not None and r.task_il.accuracy_matrix == TASK_IL
    assert r.config["method"]["lambda"] == 0.5 and r.versions["torch"] == "2.13.0"
    p = load_run(runs["zscl-partial"])
    assert (p.finished_steps, p.total_steps, p.partial) == (2, 4, True)
    assert p.class_il.accuracy_matrix == CLASS_IL[:2] and p.class_il.last is None


def test_rows_equal_the_json(runs):
    rows = comparison_rows(load_runs(runs.values()))
    assert [row["name"] for row in rows] == list(runs)
    for row, run in zip(rows, runs.values()):
        data = json.loads((run / "metrics.json").read_text())
        assert all(k in row for k, _ in COLUMNS)
        assert (row["method"], row["scenario"], row["backbone"]) == (data["method"], data["scenario"], data["backbone"])
        assert (row["finished_steps"], row["total_steps"]) == (data["finished_steps"], len(data["steps"]))
        for k in METRIC_KEYS:
            assert row[k] == data[k]  # exactly the trainer's numbers, nothing recomputed
        til = data["task_il"]
        assert row["task_il_last"] == (til["last"] if til else None)
        assert row["task_il_avg"] == (til["avg"] if til else None)
    full, classil, partial, empty = rows
    assert full["steps"] == "4/4" and not full["partial"] and full["task_il_last"] is not None
    assert classil["task_il_last"] is None and classil["last"] == full["last"]
    assert partial["steps"] == "2/4 (partial)" and partial["partial"] and partial["last"] is None
    assert empty["steps"] == "0/4 (partial)"


def test_format_metric_and_row(runs):
    assert format_metric(None) == "-" and format_metric(float("nan")) == "-"
    assert format_metric(72.4999) == "72.5" and format_metric(-3.04) == "-3.0" and format_metric(0) == "0.0"
    full, _, partial, _ = comparison_rows(load_runs(runs.values()))
    cells = dict(zip([k for k, _ in COLUMNS], format_row(full)))
    assert cells["name"] == "ft-taskil" and cells["steps"] == "4/4"
    assert cells["last"] == f"{metrics.last(CLASS_IL):.1f}" and cells["task_il_avg"] == f"{metrics.avg(TASK_IL):.1f}"
    assert format_row(partial)[5:] == ["-"] * (len(COLUMNS) - 5)


# -- errors -----------------------------------------------------------------------------------

def one_line_error(path) -> str:
    with pytest.raises(UserError) as exc:
        load_run(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_directory(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope")


def test_directory_without_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    assert one_line_error(tmp_path / "empty") == (
        f"{tmp_path / 'empty'} is not a uniil run directory (no metrics.json); pass the --out of `uniil train`")
    (tmp_path / "empty" / "config.json").write_text("{}")  # a run that started but finished no step
    assert "no finished training step yet" in one_line_error(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    assert "is not a directory" in one_line_error(tmp_path / "afile")


@pytest.mark.parametrize("content, words", [
    ('{"scenario": "x", "steps": [', "corrupt"),
    ("", "corrupt"),
    (b"\xff\xfe{}", "corrupt"),
    ("[1, 2]", "not a valid uniil metrics file"),
    (json.dumps(metrics_json(accuracy_matrix=[[1.0, 2.0]])), "row 0 must have 4 entries"),
    (json.dumps(metrics_json(last="high")), "last is not a number"),
    (json.dumps(metrics_json(steps=[])), "'steps' is missing"),
    (json.dumps(metrics_json(finished_steps=9)), "finished_steps"),
])
def test_corrupt_metrics(tmp_path, content, words):
    run = tmp_path / "bad"
    run.mkdir()
    target = run / "metrics.json"
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    assert words in one_line_error(run)


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(UserError):
        write_report([], tmp_path / "out")


def test_import_stays_light():
    code = "import sys, uniil.trainer.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- the report folder ------------------------------------------------------------------------

@pytest.fixture
def report(runs, tmp_path) -> tuple[Path, list]:
    records = load_runs(runs.values())
    return write_report(records, tmp_path / "report" / "nested"), records


def test_report_files(report):
    page, records = report
    out = page.parent
    assert page == out / "report.html"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["curves.png"] + [f"matrix-{n}-{r.name}.png" for n, r in enumerate(records, 1)])
    assert sorted(p.name for p in out.iterdir()) == sorted(pngs + ["report.html"])  # no temp files left
    for name in pngs:
        data = (out / name).read_bytes()
        w, h = png_size(data)
        assert 300 <= w <= 3000 and 200 <= h <= 3000, (name, w, h)
        assert 5_000 < len(data) < 2_000_000, name
    # the task-IL panel sits beside the class-IL one
    assert png_size((out / "matrix-1-ft-taskil.png").read_bytes())[0] > \
        png_size((out / "matrix-2-lwf-classil.png").read_bytes())[0] * 1.4


def test_html_embeds_images_and_table(report):
    page, records = report
    text = page.read_text(encoding="utf-8")
    for r in records:
        assert r.name in text
    embedded = [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)]
    assert len(embedded) == 1 + len(records)
    on_disk = {p.read_bytes() for p in page.parent.glob("*.png")}
    assert set(embedded) == on_disk  # the very same PNGs, inline: the page works as one file
    assert not re.search(r"(src|href)=['\"](?!data:|#)", text)  # nothing fetched from elsewhere
    assert text.count("<tr class='partial'>") == 2 and text.count("<tr class='complete'>") == 2
    assert "method.lambda" in text and "2.13.0" in text  # config summary and versions


def test_html_escapes_and_mixed_scenarios(tmp_path):
    a = make_run(tmp_path, "a<b>", metrics_json(config={"note": "<script>alert(1)</script>"}))
    b = make_run(tmp_path, "other", metrics_json("lwf", scenario="office-home", task_il=False))
    page = write_report(load_runs([a, b]), tmp_path / "out")
    text = page.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)" in text and "a&lt;b&gt;" in text
    assert "2 different scenarios" in text
    assert (tmp_path / "out" / "matrix-1-a_b.png").is_file()


def test_report_overwrites_previous(report):
    page, records = report
    before = page.stat().st_mtime_ns
    assert write_report(records[:1], page.parent) == page
    assert page.stat().st_mtime_ns >= before and "lwf-classil" not in page.read_text(encoding="utf-8")


# -- as a person sees it ----------------------------------------------------------------------

@pytest.mark.browser
def test_report_renders_in_chromium(report, tmp_path):
    page, records = report
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), user_dir=tmp_path / "chrome")
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert loaded and int(loaded.group(1)) == 1 + len(records)  # the curves and every heatmap decoded
    table = re.search(r'<table id="comparison">(.*?)</table>', dom, re.S)
    assert table
    body_rows = re.findall(r"<tr class=\"(?:partial|complete)\">(.*?)</tr>", table.group(1), re.S)
    assert [re.search(r"<td[^>]*>(.*?)</td>", row).group(1) for row in body_rows] == [r.name for r in records]
    assert "2/4 (partial)" in table.group(1)
    shot = tmp_path / "report.png"
    chromium("--window-size=1200,1600", f"--screenshot={shot}", page.as_uri(), user_dir=tmp_path / "chrome2")
    assert shot.stat().st_size > 20_000
