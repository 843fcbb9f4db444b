"""`uniil bench`: every method x seed as `uniil train` runs, mean and sample std over seeds in
bench.json / bench.md, a per-step curve with seed bands, the report of every run; reruns skip
finished runs and resume interrupted ones; a failed run is recorded while the others finish;
mistakes are one-line errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, run_metrics
from uniil.errors import UserError
from uniil.trainer import bench as B
from uniil.trainer import engine
from uniil.trainer.config import TrainConfig

SHORT = "steps:\n  - {dataset: synthetic, classes: '0-4', domain: photo}\n" \
        "  - {dataset: synthetic, classes: '4-8', domain: photo}\n"
FAST = ["--clip-model", "uniil-tiny", "--train-per-class", "4", "--test-per-class", "2", "--batch-size", "16",
        "--iters", "2"]
# A plain option reaches every method, a targeted one only its method.
OPTS = ["--opt", "templates=a rendering of a {}.", "--opt", "finetune:adapter_rank=8"]
REAL_TRAIN = engine.train
KEYS = ("last", "avg", "avg_incremental", "transfer", "forgetting", "bwt")


class Calls:
    """engine.train wrapped: counts the runs the bench trains (and whether each resumed)."""

    def __init__(self, monkeypatch, fail=None):
        self.configs = []
        real = REAL_TRAIN

        def train(cfg, progress=None, on_step=None):
            self.configs.append(cfg)
            if fail is not None and (cfg.method, cfg.seed) == fail:
                def on_step_then_fail(summary):  # the first step finishes, then the run breaks
                    raise RuntimeError("boom after step 1")
                return real(cfg, progress, on_step_then_fail)
            return real(cfg, progress, on_step)

        monkeypatch.setattr(engine, "train", train)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "short.yaml"
    path.write_text(SHORT)
    return path


def bench_args(scenario, out, *extra, methods="zeroshot,finetune", seeds="0,1"):
    return ["bench", "--scenario", scenario, "--methods", methods, "--seeds", seeds, "--out", out, *FAST, *OPTS,
            *extra]


@pytest.fixture(scope="module")
def bench(scenario, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("bench") / "b"
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        res = run_cli(*bench_args(scenario, out))
    assert res.code == 0, res.err
    return out, res, calls


def test_bench_json_holds_each_seed_and_numpy_mean_and_sample_std(bench):
    out, res, calls = bench
    assert [(c.method, c.seed, c.resume) for c in calls.configs] == [
        ("zeroshot", 0, False), ("zeroshot", 1, False), ("finetune", 0, False), ("finetune", 1, False)]
    data = json.loads((out / "bench.json").read_text())
    assert data["methods"] == ["zeroshot", "finetune"] and data["seeds"] == [0, 1] and data["failed"] == []
    for method in ("zeroshot", "finetune"):
        result = data["results"][method]
        records = [run_metrics(out / "runs" / f"{method}-seed{s}") for s in (0, 1)]
        assert all(not r.partial and r.seed == s and r.method == method for r, s in zip(records, (0, 1)))
        assert result["n"] == 2
        for key in KEYS:
            values = np.array([getattr(r.class_il, key) for r in records])
            assert [result["seeds"][str(s)]["metrics"][key] for s in (0, 1)] == pytest.approx(list(values))
            assert result["mean"][key] == pytest.approx(values.mean())
            assert result["std"][key] == pytest.approx(values.std(ddof=1))
        assert result["mean"]["task_il_last"] is None  # one dataset: no task-IL
        curves = [B.seen_curve(r) for r in records]
        assert result["curve"]["mean"] == pytest.approx(list(np.mean(curves, axis=0)))
        assert result["curve"]["std"] == pytest.approx(list(np.std(curves, axis=0, ddof=1)))
        assert result["curve"]["mean"][-1] == pytest.approx(  # after the last step: the union of all test sets
            np.mean([sum(a * n for a, n in zip(r.class_il.accuracy_matrix[-1], r.test_sizes)) / sum(r.test_sizes)
                     for r in records]))
    # the plain --opt went to both methods, the targeted one to finetune only; the runs recorded them
    assert data["results"]["zeroshot"]["options"]["templates"] == "a rendering of a {}."
    assert data["results"]["finetune"]["options"]["templates"] == "a rendering of a {}."
    assert data["results"]["finetune"]["options"]["adapter_rank"] == 8
    assert "adapter_rank" not in data["results"]["zeroshot"]["options"]
    assert run_metrics(out / "runs" / "finetune-seed0").config["method_options"]["adapter_rank"] == 8


def test_bench_md_table_curves_report_and_terminal(bench):
    out, res, _ = bench
    md = (out / "bench.md").read_text()
    data = json.loads((out / "bench.json").read_text())
    m = data["results"]["finetune"]
    row = f"| finetune | 2/2 | {m['mean']['last']:.1f} ± {m['std']['last']:.1f} | {m['mean']['avg']:.1f} ± "
    assert row in md
    assert "| method | seeds | Last | Avg | Avg inc. | Transfer | Forgetting | BWT | task-IL Last |" in md
    assert "Failed runs: none." in md and "](curves.png)" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report" / "report.html").read_text()
    assert all(f"{m}-seed{s}" in html for m in ("zeroshot", "finetune") for s in (0, 1))
    assert "finetune" in res.out and "±" in res.out and "bench.md" in res.out  # the rich table and where files are


def test_rerun_skips_finished_runs(bench, scenario, monkeypatch):
    out, _, _ = bench
    files = sorted((out / "runs").glob("*/metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    table = json.loads((out / "bench.json").read_text())
    calls = Calls(monkeypatch)
    res = run_cli(*bench_args(scenario, out))
    assert res.code == 0, res.err
    assert calls.configs == []  # nothing trained again
    assert {p: p.stat().st_mtime_ns for p in files} == before
    again = json.loads((out / "bench.json").read_text())
    assert {m: r["mean"] for m, r in again["results"].items()} == {m: r["mean"] for m, r in table["results"].items()}
    assert all(s["status"] == B.FINISHED_EARLIER for r in again["results"].values() for s in r["seeds"].values())


def test_a_failed_run_is_recorded_the_others_finish_and_a_rerun_resumes_it(bench, scenario, tmp_path, monkeypatch,
                                                                          cache_dir):
    out = tmp_path / "b"
    calls = Calls(monkeypatch, fail=("finetune", 1))
    res = run_cli(*bench_args(scenario, out))
    assert res.code == 1
    assert len(calls.configs) == 4  # the failure did not stop the grid
    last = res.err.strip().splitlines()[-1]
    assert "1 of 4 runs failed" in last and "Traceback" not in res.err
    data = json.loads((out / "bench.json").read_text())
    assert data["failed"] == [{"method": "finetune", "seed": 1, "reason": "RuntimeError: boom after step 1"}]
    ft = data["results"]["finetune"]
    assert ft["seeds"]["1"]["status"] == B.FAILED and ft["seeds"]["1"]["metrics"]["last"] is None
    assert ft["n"] == 1 and ft["std"]["last"] is None  # one seed: no std
    assert ft["mean"]["last"] == pytest.approx(run_metrics(out / "runs" / "finetune-seed0").class_il.last)
    md = (out / "bench.md").read_text()
    assert "| finetune | 1/2 (failed: 1) |" in md
    assert "finetune seed 1 (runs/finetune-seed1): RuntimeError: boom after step 1" in md
    assert "boom after step 1" in res.out  # the terminal table's failure lines
    assert run_metrics(out / "runs" / "finetune-seed1").partial  # 1 of 2 steps kept
    assert "finetune-seed1" in (out / "report" / "report.html").read_text()  # reported as partial

    calls = Calls(monkeypatch)
    res = run_cli(*bench_args(scenario, out))
    assert res.code == 0, res.err
    assert [(c.method, c.seed, c.resume) for c in calls.configs] == [("finetune", 1, True)]
    resumed = run_metrics(out / "runs" / "finetune-seed1")
    assert not resumed.partial
    # same seed, same machine: the resumed run ends as the uninterrupted one of the first bench
    uninterrupted = run_metrics(bench[0] / "runs" / "finetune-seed1")
    assert np.allclose(resumed.class_il.accuracy_matrix, uninterrupted.class_il.accuracy_matrix)
    assert json.loads((out / "bench.json").read_text())["failed"] == []


@pytest.mark.parametrize("change, words", [
    (["--methods", "zeroshot,finetune,nosuch"], "unknown method 'nosuch'"),
    (["--methods", "zeroshot,zeroshot"], "names zeroshot twice"),
    (["--scenario", "no-such-scenario"], "unknown scenario 'no-such-scenario'"),
    (["--seeds", "0,x"], "--seeds: 'x' is not a seed"),
    (["--seeds", "1,1"], "--seeds names 1 twice"),
    (["--seeds", "-1"], "is not a seed"),
    (["--opt", "label_smoothing=0.1"], "method zeroshot has no option label_smoothing"),
    (["--opt", "zeroshot:prototypes=nope"], "zeroshot: --opt prototypes='nope': use one of"),
    (["--opt", "finetune:rank=8"], "finetune: unknown option(s) rank"),
    (["--opt", "mage:beta=0"], "mage is not one of --methods"),
    (["--opt", "novalue"], "write key=value"),
    (["--methods", "zeroshot,finetune,mage"], "method mage needs an attribute pool"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_mistakes_are_one_line_errors_that_write_nothing(scenario, tmp_path, monkeypatch, change, words):
    calls = Calls(monkeypatch)
    out = tmp_path / "b"
    args = bench_args(scenario, out)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args and flag != "--opt":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    res = run_cli(*args)
    assert res.code == 1
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert words in res.err and "Traceback" not in res.err
    assert not out.exists() and calls.configs == []


def test_a_run_directory_with_another_config_is_refused_naming_it(bench, scenario, monkeypatch):
    out, _, _ = bench
    before = (out / "bench.json").stat().st_mtime_ns
    calls = Calls(monkeypatch)
    res = run_cli(*bench_args(scenario, out, "--lr", "0.5"))
    assert res.code == 1 and len(res.err.strip().splitlines()) == 1, res.err
    assert "zeroshot-seed0 holds a run with a different config: lr (0.001 -> 0.5)" in res.err
    assert calls.configs == [] and (out / "bench.json").stat().st_mtime_ns == before


# -- the pieces --------------------------------------------------------------------------------

def test_option_items_plain_and_targeted():
    shared, own = B.parse_option_items(["templates=a {}: b", "finetune:adapter-rank=8", "finetune:templates=x {}"],
                                       ["zeroshot", "finetune"])
    assert shared == {"templates": "a {}: b"} and own == {"finetune": {"adapter_rank": "8", "templates": "x {}"}}
    cfg = B.BenchConfig("s", ("zeroshot", "finetune"), (0,), Path("o"), TrainConfig("s", "", Path("o")),
                        shared, own)
    assert cfg.options("zeroshot") == {"templates": "a {}: b"}
    assert cfg.options("finetune") == {"templates": "x {}", "adapter_rank": "8"}  # the targeted value wins
    assert cfg.run_config("finetune", 3).out == Path("o/runs/finetune-seed3")
    with pytest.raises(UserError, match="write key=value"):
        B.parse_option_items([":k=1"], ["zeroshot"])


def test_seeds_and_stats():
    assert B.parse_seeds("2, 0,1") == (2, 0, 1) and B.parse_seeds([3]) == (3,)
    for bad in ("", "1.5", "a", "0,,0"):
        with pytest.raises(UserError):
            B.parse_seeds(bad)
    s = B.Stat.of([1.0, 2.0, None, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert B.Stat.of([5.0]).std is None and B.Stat.of([5.0]).text() == "5.0"
    assert B.Stat.of([None]).mean is None and B.Stat.of([]).text() == "-"
    assert B.Stat.of([1.0, 2.0]).text() == "1.5 ± 0.7"
