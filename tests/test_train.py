"""`uniil train` end to end on the synthetic scenario with the tiny backbone: metrics.json as
docs/methods.md#metrics defines it, safetensors checkpoints, determinism, Ctrl-C + --resume, bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli, run_metrics
from uniil.trainer import metrics as M

FAST = ["--scenario", "synthetic-uniil", "--recipe", "none", "--clip-model", "uniil-tiny", "--train-per-class", "8",
        "--test-per-class", "4", "--batch-size", "32"]



@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "finetune"
    res = run_cli("train", *FAST, "--method", "finetune", "--out", run)
    assert res.code == 0, res.err
    return run, res


def test_metrics_json_holds_the_full_matrix_and_the_field_metrics(finetune_run):
    run, res = finetune_run
    m = run_metrics(run)
    a = m.class_il.accuracy_matrix
    assert len(a) == 7 and all(len(row) == 7 for row in a) and m.finished_steps == 7
    assert all(0 <= v <= 100 for row in a for v in row)
    expected = M.summarize(a, m.test_sizes)
    for key in ("last", "avg", "avg_incremental", "transfer", "forgetting", "bwt"):
        assert getattr(m.class_il, key) == pytest.approx(expected[key])
    # 8, 8, 16 shapes, 10 digits, 8 shapes, 10 patterns, 24 shapes x 4 test images
    assert m.test_sizes == [32, 32, 64, 40, 32, 40, 96]
    assert [s.kind for s in m.steps] == ["base", "class", "domain", "task", "class+domain", "task", "domain"]
    # two datasets: task-IL too, where a step competes only with its own dataset's classes
    t = m.task_il.accuracy_matrix
    assert len(t) == 7 and m.task_il.last == pytest.approx(M.last(t))
    assert all(t[j][i] >= a[j][i] for j in range(7) for i in range(7))  # a smaller vocabulary never hurts
    assert m.versions["torch"] and m.config["method"] == "finetune"
    assert len(m.timings.train_s) == 7
    assert "step 7/7 [domain] synthetic/painting" in res.err  # one summary line per step


def test_checkpoints_are_safetensors_of_the_adapters_only(finetune_run):
    from safetensors.torch import load_file

    run, _ = finetune_run
    files = sorted((run / "checkpoints").glob("*.safetensors"))
    assert [f.name for f in files] == [f"step-{i:03d}.safetensors" for i in range(1, 8)]
    tensors = load_file(str(files[-1]))
    assert tensors and all(k.startswith("adapters.") for k in tensors)
    first = load_file(str(files[0]))
    assert any((tensors[k] != first[k]).any() for k in tensors)  # later steps trained further


def test_same_seed_same_metrics(finetune_run, tmp_path):
    run, _ = finetune_run
    again = tmp_path / "again"
    assert run_cli("train", *FAST, "--method", "finetune", "--out", again).code == 0
    assert run_metrics(again).class_il.accuracy_matrix == run_metrics(run).class_il.accuracy_matrix
    other = tmp_path / "other-seed"
    assert run_cli("train", *FAST, "--method", "finetune", "--out", other, "--seed", "1").code == 0
    from safetensors.torch import load_file
    a = load_file(str(run / "checkpoints" / "step-001.safetensors"))
    b = load_file(str(other / "checkpoints" / "step-001.safetensors"))
    assert any((a[k] != b[k]).any() for k in a)


def interrupt_after_second_step(cmd: list[str], run_dir, env=None) -> subprocess.CompletedProcess:
    """Start `cmd`, and as soon as its second step's checkpoint exists freeze it (SIGSTOP), send
    Ctrl-C and let it go on: it sees the interrupt during its third step, however busy the machine."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    second = run_dir / "checkpoints" / "step-002.json"
    deadline = time.time() + 240
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    # Steps long enough (100 optimiser steps each) that the run cannot finish between the check
    # for step 2's checkpoint and the SIGSTOP, even on a loaded machine.
    args = [*FAST, "--iters", "100", "--method", "finetune"]
    run, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli("train", *args, "--out", run).code == 0
    proc = interrupt_after_second_step([sys.executable, "-m", "uniil.cli", "train", *args, "--out", str(resumed)],
                                       resumed)
    err = proc.stderr
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    m = run_metrics(resumed)
    assert 2 <= m.finished_steps < 7 and m.class_il.last is None  # partial, metrics not yet defined
    res = run_cli("train", *args, "--out", resumed, "--resume")
    assert res.code == 0, res.err
    assert run_metrics(resumed).class_il.accuracy_matrix == run_metrics(run).class_il.accuracy_matrix
    # resuming a finished run trains nothing and keeps the result
    assert run_cli("train", *args, "--out", resumed, "--resume").code == 0
    assert run_metrics(resumed).finished_steps == 7


def test_ctrl_c_between_a_checkpoint_and_metrics_json_waits_for_both(tmp_path, monkeypatch):
    """A Ctrl-C right after a step's checkpoint is written must not leave metrics.json counting one
    step fewer: a resumed run starts after the steps it counts and would train that step again
    (seen once under load: the interrupted run's metrics.json said 1 step beside step 2's checkpoint)."""
    import json

    import torch

    from uniil.trainer import checkpoint as ckpt

    real = ckpt.atomic_write_text

    def write_then_interrupt(path, text):
        real(path, text)
        if path.name.endswith(".json") and path.parent.name == ckpt.STATE_DIR:
            signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, just after the checkpoint

    monkeypatch.setattr(ckpt, "atomic_write_text", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_step(tmp_path, 1, {"w": torch.zeros(2)}, {"step": 2}, {"finished": 2})
    assert json.loads((tmp_path / ckpt.METRICS).read_text()) == {"finished": 2}
    assert (tmp_path / ckpt.STATE_DIR / "step-002.json").exists()


def test_zeroshot_reads_cached_features(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path / "cache"))
    res = run_cli("train", *FAST, "--method", "zeroshot", "--out", tmp_path / "zs")
    assert res.code == 0, res.err
    m = run_metrics(tmp_path / "zs")
    a = m.class_il.accuracy_matrix
    # no training: a step's accuracy changes only with the vocabulary it competes in. Steps 3 and 7
    # add no class (same vocabulary as the step before), so their rows repeat the previous ones.
    assert a[2][:2] == a[1][:2] and a[6] == a[5]
    assert a[0][0] >= a[1][0] >= a[4][0]  # more classes to confuse with never helps a frozen model
    assert list((tmp_path / "cache" / "features").rglob("features.npy"))  # per (backbone, split) cache
    again = run_cli("train", *FAST, "--method", "zeroshot", "--out", tmp_path / "zs2")
    assert again.code == 0 and run_metrics(tmp_path / "zs2").class_il.accuracy_matrix == a


@pytest.mark.parametrize("args, message", [
    (["--scenario", "nope", "--method", "finetune"], "unknown scenario 'nope'; presets:"),
    (["--scenario", "synthetic-uniil", "--method", "nope"], "unknown method 'nope'; known:"),
    (["--scenario", "synthetic-uniil", "--method", "finetune", "--precision", "fp8"], "unknown --precision fp8"),
    (["--scenario", "synthetic-uniil", "--method", "finetune", "--opt", "oops"], "write key=value"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    res = run_cli("train", *args, "--out", tmp_path / "r", "--clip-model", "uniil-tiny")
    assert res.code == 1 and message in res.err and "Traceback" not in res.err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_scenario_file_with_unknown_class_names_the_step(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("steps:\n  - {dataset: synthetic, classes: [circle]}\n  - {dataset: synthetic, classes: [dragon]}\n")
    res = run_cli("train", "--scenario", f, "--method", "finetune", "--out", tmp_path / "r")
    assert res.code == 1 and "step 2: unknown class 'dragon'" in res.err


def test_existing_run_needs_resume_and_the_same_config(finetune_run, tmp_path):
    run, _ = finetune_run
    res = run_cli("train", *FAST, "--method", "finetune", "--out", run)
    assert res.code == 1 and "pass --resume" in res.err
    res = run_cli("train", *FAST, "--method", "finetune", "--out", run, "--resume", "--lr", "0.5")
    assert res.code == 1 and "different config" in res.err and "lr" in res.err


def test_pool_of_another_backbone_is_refused(tmp_path, llm_server):
    from conftest import server_args

    pool = tmp_path / "p.duckdb"
    assert run_cli("attrs", "build", "--dataset", "synthetic", "--pool", pool, *server_args(llm_server)).code == 0
    res = run_cli("train", "--scenario", "synthetic-uniil", "--method", "finetune", "--out", tmp_path / "r",
                  "--pool", pool, "--clip-model", "ViT-B-32", "--clip-pretrained", "none")
    assert res.code == 1 and "was built with backbone uniil-tiny" in res.err


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(finetune_run, tmp_path):
    """torchrun with the gloo backend: each rank trains on half of every global batch and
    evaluates half of each test set; averaged gradients make it the same run as one process."""
    from conftest import free_port

    run, _ = finetune_run
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "uniil.cli", "train", *FAST, "--method", "finetune", "--out", str(ddp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = run_metrics(ddp).class_il.accuracy_matrix, run_metrics(run).class_il.accuracy_matrix
    assert run_metrics(ddp).test_sizes == run_metrics(run).test_sizes  # every test image counted once
    # the same updates up to float summation order: at most a couple of borderline predictions move
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) <= 6.25


def test_description_zero_shot_through_the_engine(tmp_path, llm_server):
    """zeroshot with the pool's attributes as class prototypes (classification by description)."""
    from conftest import server_args

    pool = tmp_path / "p.duckdb"
    for dataset in ("synthetic", "synthetic-digits", "synthetic-patterns"):  # one pool, several datasets
        assert run_cli("attrs", "build", "--dataset", dataset, "--pool", pool, *server_args(llm_server)).code == 0
    res = run_cli("train", *FAST, "--method", "zeroshot", "--out", tmp_path / "plain")
    runs = {}
    for kind in ("descriptions", "enriched"):
        runs[kind] = tmp_path / kind
        res = run_cli("train", *FAST, "--method", "zeroshot", "--pool", pool, "--opt", f"prototypes={kind}",
                      "--out", runs[kind])
        assert res.code == 0, res.err
    a = {k: run_metrics(v).class_il.accuracy_matrix for k, v in runs.items()}
    assert a["descriptions"] != run_metrics(tmp_path / "plain").class_il.accuracy_matrix
    assert a["enriched"] != a["descriptions"]
    res = run_cli("train", *FAST, "--method", "zeroshot", "--opt", "prototypes=descriptions", "--out", tmp_path / "x")
    assert res.code == 1 and "with --opt prototypes=descriptions needs an attribute pool" in res.err
