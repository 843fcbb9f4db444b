"""`calfuse` (docs/methods.md#calfuse): the pure math (QR fusion, replay statistics, calibration),
the method driven directly on separable synthetic features over base, task, class and domain
steps, and `uniil train --method calfuse` end to end on synthetic-uniil with uniil-tiny
(cached features, checkpoints, Ctrl-C + --resume)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_cli, run_metrics
from uniil.trainer.methods.base import Batch, StepData
from uniil.trainer.methods.calfuse import (CalFuse, calibration_alpha, class_moments, confusable_pairs, fusion_mask,
                                           merge_moments, qr_fuse, shrunk_covariance)

FAST = ["--scenario", "synthetic-uniil", "--recipe", "none", "--clip-model", "uniil-tiny", "--train-per-class", "8",
        "--test-per-class", "4", "--batch-size", "32"]


# -- QR fusion ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [6, 3])  # square (full column space) and rectangular (a subspace)
def test_fusion_with_mask_one_gives_the_new_weights(k):
    g = torch.Generator().manual_seed(0)
    w_old, w_new = torch.randn(6, k, generator=g, dtype=torch.float64), torch.randn(6, k, generator=g, dtype=torch.float64)
    w, _, _ = qr_fuse(w_old, w_new, mask=torch.ones(()))
    assert torch.allclose(w, w_new, atol=1e-10)


@pytest.mark.parametrize("k", [6, 3])
def test_fusion_with_mask_zero_gives_the_old_weights_within_their_column_space(k):
    g = torch.Generator().manual_seed(1)
    w_old, w_new = torch.randn(6, k, generator=g, dtype=torch.float64), torch.randn(6, k, generator=g, dtype=torch.float64)
    w, q, _ = qr_fuse(w_old, w_new, mask=torch.zeros(()))
    inside = q @ q.T
    assert torch.allclose(inside @ w, w_old, atol=1e-10)  # the old column space holds W_old exactly
    outside = torch.eye(6, dtype=torch.float64) - inside
    assert torch.allclose(outside @ w, outside @ w_new, atol=1e-10)  # the rest is W_new's
    if k == 6:  # a full-rank square W_old spans everything: W = W_old
        assert torch.allclose(w, w_old, atol=1e-10)


def test_q_is_orthonormal_and_reconstructs_the_old_weights():
    g = torch.Generator().manual_seed(2)
    for shape in [(8, 8), (8, 3)]:
        w_old, w_new = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        _, q, _ = qr_fuse(w_old, w_new)
        assert torch.allclose(q.T @ q, torch.eye(shape[1]), atol=1e-5)
        r = q.T @ w_old
        assert torch.allclose(q @ r, w_old, atol=1e-5)
        assert torch.allclose(torch.tril(r, -1), torch.zeros_like(r), atol=1e-5)  # R upper triangular


def test_default_mask_lies_in_mu_to_one_and_interpolates():
    g = torch.Generator().manual_seed(3)
    w_old = torch.randn(5, 5, generator=g, dtype=torch.float64)
    w_new = w_old + 0.1 * torch.randn(5, 5, generator=g, dtype=torch.float64)
    w, q, m = qr_fuse(w_old, w_new, mu=0.6)
    assert float(m.min()) >= 0.6 - 1e-12 and float(m.max()) == pytest.approx(1.0)
    # the largest change in the Q basis survives in full; a fused W lies between old and new
    assert float((w - w_old).norm()) <= float((w_new - w_old).norm()) + 1e-12
    p, r = q.T @ w_new, q.T @ w_old
    assert torch.allclose(fusion_mask(p, r, 0.6), m)
    # nothing changed: nothing to fuse
    same, _, _ = qr_fuse(w_old, w_old.clone())
    assert torch.allclose(same, w_old, atol=1e-10)


# -- replay statistics ----------------------------------------------------------------------------
def test_replay_statistics_match_the_data_they_summarise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    rows = rng.integers(0, 3, 60)
    count, mean, scatter = class_moments(torch.from_numpy(x), torch.from_numpy(rows), 4)
    for r in range(3):
        xr = x[rows == r]
        assert count[r] == len(xr)
        assert np.allclose(mean[r].numpy(), xr.mean(0))
        assert np.allclose((scatter[r] / (count[r] - 1)).numpy(), np.cov(xr.T))
    assert count[3] == 0 and not mean[3].any() and not scatter[3].any()
    # merging the statistics of two halves gives the statistics of the whole (a domain step)
    half = 30
    a = class_moments(torch.from_numpy(x[:half]), torch.from_numpy(rows[:half]), 4)
    b = class_moments(torch.from_numpy(x[half:]), torch.from_numpy(rows[half:]), 4)
    n, m, inc = merge_moments(a[0], a[1], b[0], b[1], b[2])
    assert torch.allclose(n, count) and torch.allclose(m, mean)
    assert torch.allclose(a[2] + inc, scatter)


def test_shrunk_covariance_is_positive_definite_and_keeps_the_trace():
    x = torch.randn(4, 16, dtype=torch.float64)  # fewer samples than dimensions: S is singular
    count, _, scatter = class_moments(x, torch.zeros(4, dtype=torch.long), 1)
    cov = shrunk_covariance(scatter, count - 1, 0.1, floor=0.0)
    assert torch.linalg.eigvalsh(cov[0]).min() > 0
    assert torch.trace(cov[0]) == pytest.approx(float(torch.trace(scatter[0] / 3)))
    assert torch.allclose(shrunk_covariance(scatter, count - 1, 0.0, floor=0.0), scatter / 3)


# -- calibration ----------------------------------------------------------------------------------
def test_alpha_stays_strictly_inside_zero_one():
    h = torch.tensor([0.0, 0.5, 3.0, 10.0, 1e4])
    for kappa in (-1e6, -5.0, 0.0, 1.0, 1e6):
        for b in (-1e3, 0.0, 1e3):
            a = calibration_alpha(h, h.flip(0), torch.tensor([kappa]), torch.tensor([b]))
            assert bool(((a > 0) & (a < 1)).all()), (kappa, b, a)


def _method(d=16, classes=8, **options) -> CalFuse:
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(classes, d), dim=-1)
    return CalFuse(SimpleNamespace(spec=None), text, options)


def test_calibrated_features_are_unit_vectors_and_fixed_alpha_is_an_option():
    m = _method()
    with torch.no_grad():
        m.A.add_(0.3 * torch.randn(16, 16))
    f = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    g, alpha = m.calibrate(f, torch.arange(8))
    assert bool(((alpha > 0) & (alpha < 1)).all()) and alpha.std() > 0  # per sample
    assert torch.allclose(g.norm(dim=-1), torch.ones(50), atol=1e-5)
    g2, _, cos = m.calibrate(f, torch.arange(2, 7), with_cosines=True)  # g's cosines without another matmul
    assert torch.allclose(cos, g2 @ m.text[2:7].T, atol=1e-5)
    fixed = _method(calibration="fixed", alpha=0.25)
    _, a = fixed.calibrate(f, torch.arange(8))
    assert torch.allclose(a, torch.full_like(a, 0.25)) and not fixed.kappa.requires_grad
    # A = I: both features agree, so g = f whatever alpha is
    g0, _ = _method().calibrate(f, torch.arange(8))
    assert torch.allclose(g0, f, atol=1e-6)


def test_confusable_pairs_use_the_cosine_distance_threshold():
    t = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # cos(0,1) = 0.8, cos(1,2) = 0.6, cos(0,2) = 0
    pairs = confusable_pairs(t, 0.55)  # distance < 0.55  <=>  cos > 0.45
    assert pairs.tolist() == [[False, True, False], [True, False, True], [False, True, False]]


def test_bad_options_are_one_line_user_errors():
    from uniil.errors import UserError

    for opts, msg in [({"replay_cov": "nope"}, "use one of class, shared"), ({"mu": "x"}, "expected a number"),
                      ({"fusoin": "qr"}, "unknown option(s) fusoin"), ({"replay": "maybe"}, "true or false")]:
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            _method(**opts)


# -- the method, driven directly: base, task, class and domain steps -----------------------------
class _Driver:
    """Feeds the method separable synthetic features: each class is a cluster around a direction
    near its text embedding, each domain shifts every cluster; no backbone involved."""

    def __init__(self, method: CalFuse, d: int, seed: int = 0):
        self.m, self.d = method, d
        self.g = torch.Generator().manual_seed(seed)
        self.shift = {}
        self.steps = []

    def features(self, classes, domain, n):
        if domain not in self.shift:
            self.shift[domain] = 1.0 * torch.randn(self.d, generator=self.g)
        y = torch.tensor(classes).repeat_interleave(n)
        x = self.m.text[y] + self.shift[domain] + 0.35 * torch.randn(len(y), self.d, generator=self.g)
        return torch.nn.functional.normalize(x, dim=-1), y

    def step(self, classes, domain, iters=60):
        t = len(self.steps)
        self.steps.append((classes, domain))
        seen = torch.tensor(sorted({c for cs, _ in self.steps for c in cs}))
        x, y = self.features(classes, domain, 40)
        data = StepData(t, SimpleNamespace(domain=domain, labels=tuple(classes)), torch.tensor(classes), seen)
        self.m._step_features = lambda _data: (x, y)  # what the feature cache would give
        self.m.begin_step(t, data)
        opt = torch.optim.AdamW([p for p in self.m.parameters() if p.requires_grad], lr=1e-2)
        self.m.train()
        for i in range(iters):
            idx = torch.randint(len(x), (32,), generator=self.g)
            loss = self.m(Batch(None, y[idx], idx, None, x[idx]), data)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.m.end_step(t, data)
        self.m.eval()

    def accuracy(self, classes, domain, vocab) -> float:
        x, y = self.features(classes, domain, 30)
        with torch.no_grad():
            g = self.m.encode(Batch(None, y, torch.arange(len(y)), None, x))
            vocab = torch.tensor(vocab)
            pred = vocab[self.m.logits(g, vocab).argmax(1)]
        return float((pred == y).float().mean())


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add barrier waits (seconds on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# classes 0-5: a first "dataset"; 6-11: a second one (a task step); 12-15: new classes of the first
# (a class step); then the first dataset's classes in a new domain (a domain step).
PLAN = [(list(range(0, 6)), "photo"), (list(range(6, 12)), "photo"), (list(range(12, 16)), "photo"),
        (list(range(0, 6)), "sketch")]


def _run_plan(options, d=32, n_classes=16):
    """Accuracy per step of PLAN over all 16 classes after the last step, for calfuse and for the
    untrained model (A = I: original CLIP), plus task-IL accuracy on the second "dataset"."""
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(n_classes, d), dim=-1)
    m = CalFuse(SimpleNamespace(spec=None), text, options)
    drv = _Driver(m, d)
    for classes, domain in PLAN:
        drv.step(classes, domain)
        assert m.statistics()["replay_rows"] == len(m.row_keys)
    everything = list(range(n_classes))
    acc = [drv.accuracy(c, dom, everything) for c, dom in PLAN]
    task_il = drv.accuracy(list(range(6, 12)), "photo", list(range(6, 12)))  # the second dataset's own vocabulary
    drv.m = CalFuse(SimpleNamespace(spec=None), text, {})
    drv.m.begin_step(0, StepData(0, SimpleNamespace(domain="photo"), torch.arange(n_classes), torch.arange(n_classes)))
    zero = [drv.accuracy(c, dom, everything) for c, dom in PLAN]
    return m, acc, zero, task_il


@pytest.mark.parametrize("options", [{}, {"replay_key": "domain", "replay_cov": "shared"},
                                     {"projection_init": "identity", "calibration": "fixed"}, {"fusion": "none"}])
def test_method_learns_base_task_class_and_domain_steps(options, one_thread):
    m, acc, zero, task_il = _run_plan(options)
    # every step ends well above chance (1/16) and far above the untrained model, the first included
    assert min(acc) > 0.5 and all(a > z + 0.3 for a, z in zip(acc, zero)), (acc, zero)
    assert task_il >= acc[1] - 1e-9
    assert len(m.row_keys) == (22 if options.get("replay_key") == "domain" else 16)
    assert int((m.replay_count > 0).sum()) == len(m.row_keys)
    assert m.replay_count.sum() == 40 * 22
    if not options:  # the stored Gaussians reproduce what they summarise
        m.opts = dataclasses.replace(m.opts, replay_normalize=False)
        m._sampler = None
        torch.manual_seed(1)
        x, y = m.sample_pseudo(4000)
        for c in (0, 7, 13):
            assert torch.allclose(x[y == c].mean(0), m.replay_mean[c], atol=0.06)


def test_gaussian_replay_keeps_old_classes(one_thread):
    _, with_replay, _, _ = _run_plan({})
    _, without, _, _ = _run_plan({"replay": False})
    # the first two steps' classes are forgotten without pseudo-features (they are not in later batches)
    assert with_replay[0] > without[0] + 0.3 and with_replay[1] > without[1] + 0.3, (with_replay, without)


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calfuse_run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("runs") / "calfuse"
    res = run_cli("train", *FAST, "--method", "calfuse", "--out", run)
    assert res.code == 0, res.err
    return run


def test_calfuse_runs_synthetic_uniil_on_cached_features(calfuse_run, cache_dir):
    from safetensors.torch import load_file

    from uniil.trainer.scenario import load_scenario

    steps = load_scenario("synthetic-uniil").steps
    T = len(steps)
    m = run_metrics(calfuse_run)
    assert m.finished_steps == T and m.class_il.last is not None
    kinds = [s.kind for s in m.steps]
    assert {"class", "domain", "task", "class+domain"} <= set(kinds)  # every kind of increment, one run
    assert all(len(row) == T and all(0 <= v <= 100 for v in row) for row in m.class_il.accuracy_matrix)
    assert m.task_il is not None and m.task_il.last is not None  # two datasets: task-IL too
    stats = m.statistics
    seen = [len({(s.dataset, y) for s in steps[:t + 1] for y in s.labels}) for t in range(T)]
    assert [s["replay_rows"] for s in stats] == seen  # one Gaussian per class seen so far
    assert all(0 < s["alpha_mean"] < 1 and 0.6 <= s["fusion_mask_mean"] <= 1 for s in stats)
    assert list(cache_dir.rglob("features.npy"))  # trained and evaluated on cached features
    last = load_file(str(calfuse_run / "checkpoints" / f"step-{T:03d}.safetensors"))
    assert set(last) == {"A", "kappa", "bias", "replay_label", "replay_count", "replay_mean", "replay_scatter"}
    assert not torch.allclose(last["A"], torch.eye(len(last["A"])))
    assert last["replay_mean"].shape[0] == seen[-1] and last["replay_scatter"].shape[0] == seen[-1]


def test_replay_tables_match_the_cached_training_features(calfuse_run, cache_dir):
    """After step 1 the tables hold exactly the mean and scatter of the step's cached features."""
    from safetensors.torch import load_file

    from uniil.backbones.features import image_features
    from uniil.backbones.spec import BackboneSpec
    from uniil.trainer.sources import DataOptions, step_source
    from uniil.trainer.scenario import load_scenario

    step = load_scenario("synthetic-uniil").steps[0]
    source = step_source(step, "train", DataOptions(None, False, 8, 4))
    fs = image_features(source, BackboneSpec.from_options("uniil-tiny", None))
    assert fs.from_cache
    x, y = torch.from_numpy(fs.features).double(), torch.tensor(source.labels)
    first = load_file(str(calfuse_run / "checkpoints" / "step-001.safetensors"))
    assert first["replay_label"].tolist() == list(range(8))
    for c in range(8):
        xc = x[y == c]
        assert first["replay_count"][c] == len(xc) == 8
        assert torch.allclose(first["replay_mean"][c].double(), xc.mean(0), atol=1e-6)
        centred = xc - xc.mean(0)
        assert torch.allclose(first["replay_scatter"][c].double(), centred.T @ centred, atol=1e-5)


def test_ctrl_c_then_resume_ends_like_an_uninterrupted_calfuse_run(tmp_path, cache_dir):
    from test_train import interrupt_after_second_step

    # Steps on cached features are fast: 600 optimiser steps (about a second) each keep the run
    # busy long enough that it cannot finish between the check for step 2's checkpoint and the SIGSTOP.
    args = [*FAST, "--iters", "600", "--method", "calfuse"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli("train", *args, "--out", whole).code == 0
    proc = interrupt_after_second_step([sys.executable, "-m", "uniil.cli", "train", *args, "--out", str(resumed)],
                                       resumed, env={**os.environ, "UNIIL_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 130, proc.stderr
    m = run_metrics(resumed)
    assert 2 <= m.finished_steps < len(m.steps) and m.class_il.last is None
    res = run_cli("train", *args, "--out", resumed, "--resume")
    assert res.code == 0, res.err
    assert run_metrics(resumed).class_il.accuracy_matrix == run_metrics(whole).class_il.accuracy_matrix
    from safetensors.torch import load_file
    last = f"step-{len(m.steps):03d}.safetensors"
    a = load_file(str(resumed / "checkpoints" / last))
    b = load_file(str(whole / "checkpoints" / last))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_calfuse_options_on_the_command_line(tmp_path, cache_dir):
    f = tmp_path / "short.yaml"  # a class step then a domain step, to keep it quick
    f.write_text("steps:\n  - {dataset: synthetic, classes: '0-4', domain: photo}\n"
                 "  - {dataset: synthetic, classes: '4-8', domain: photo}\n"
                 "  - {dataset: synthetic, classes: '0-8', domain: sketch}\n")
    args = ["--scenario", f, "--clip-model", "uniil-tiny", "--train-per-class", "4", "--test-per-class", "2",
            "--batch-size", "16", "--method", "calfuse"]
    res = run_cli("train", *args, "--out", tmp_path / "r", "--opt", "replay_key=domain", "--opt", "replay_cov=shared",
                  "--opt", "calibration=fixed", "--opt", "alpha=0.3", "--opt", "mu=0.8")
    assert res.code == 0, res.err
    m = run_metrics(tmp_path / "r")
    assert [s["replay_rows"] for s in m.statistics] == [4, 8, 16]
    assert all(s["alpha_mean"] == pytest.approx(0.3) for s in m.statistics)
    res = run_cli("train", *args, "--out", tmp_path / "bad", "--opt", "replay_cov=diagonal")
    assert res.code == 1 and "--opt replay_cov='diagonal': use one of class, shared" in res.err and "Traceback" not in res.err
