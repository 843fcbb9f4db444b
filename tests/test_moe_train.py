"""The MoE layer has no host syncs or per-expert loops and compiles; `uniil train` runs
`moe-adapters` and `mage` end to end, and `mage` refuses to run without a pool."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, run_metrics, server_args
from moe_fixtures import fresh_clip, moe_cache  # noqa: F401
from uniil.trainer.adapters import Adapters, RoutingContext, noisy_logits

FAST = ["--scenario", "synthetic-uniil", "--recipe", "none", "--clip-model", "uniil-tiny", "--train-per-class", "4",
        "--test-per-class", "2", "--batch-size", "16"]


# -- the layer: batched, no host sync, compiles --------------------------------------------------
def _op_names(num_experts: int) -> list[str]:
    from torch.overrides import TorchFunctionMode

    clip = fresh_clip()
    adapters = Adapters(clip.model, num_experts=num_experts)
    w = torch.randn(adapters.num_layers, adapters.width, num_experts, requires_grad=True)
    names = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 3, 32, 32)
    ctx = RoutingContext(lambda layer, cls: noisy_logits(cls @ w[layer], cls @ w[layer], True), 2)
    with Record(), adapters.routing(ctx):
        out = clip.model.encode_image(x)
        out.sum().backward()
    return names


def test_no_host_sync_and_no_loop_over_experts_in_the_layer():
    few, many = _op_names(4), _op_names(32)
    assert few == many  # the same operations whatever E is: no per-expert work
    assert not {"item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "unique"} & set(many)


@pytest.mark.slow
def test_torch_compile_forward_and_backward_on_cpu():
    clip = fresh_clip()
    adapters = Adapters(clip.model, num_experts=6)
    w = torch.zeros(adapters.num_layers, adapters.width, 6, requires_grad=True)
    with torch.no_grad():
        for bank in adapters.banks:
            bank.up.normal_(std=0.1)

    def step(x):
        ctx = RoutingContext(lambda layer, cls: cls @ w[layer] + torch.arange(6.0), 2)
        with adapters.routing(ctx):
            loss = clip.model.encode_image(x).pow(2).mean()
        loss.backward()
        return loss

    x = torch.randn(4, 3, 32, 32)
    eager = step(x).detach()
    grad = adapters.banks[0].up.grad.clone()
    adapters.zero_grad()
    compiled = torch.compile(step)(x).detach()
    assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-6)
    assert torch.allclose(grad, adapters.banks[0].up.grad, rtol=1e-3, atol=1e-6)


# -- end to end ----------------------------------------------------------------------------------
def test_train_moe_adapters_end_to_end(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "moe"
    res = run_cli("train", *FAST, "--method", "moe-adapters", "--out", run, "--opt", "preset=mtil",
                  "--opt", "num_experts=4", "--opt", "ddas_epochs=2", "--iters", "2")
    assert res.code == 0, res.err
    m = run_metrics(run)
    assert m.finished_steps == len(m.steps) and m.class_il.last is not None
    stats = m.statistics[-1]
    assert len(stats["usage"]) == 2 and stats["routers"] == len(m.steps)
    assert sum(stats["ddas"]["task_counts"]) + stats["ddas"]["original_clip"] == sum(m.test_sizes)
    tensors = load_file(str(sorted((run / "checkpoints").glob("*.safetensors"))[-1]))
    assert "w_gate.0" in tensors and "selector.tasks.0.enc.weight" in tensors
    assert "text_experts.w_gate.0" in tensors and "text_experts.adapters.banks.0.frozen" in tensors
    assert not any(k.endswith(".tokens") for k in tensors)  # derived from the scenario, not saved
    res = run_cli("train", *FAST, "--method", "moe-adapters", "--out", tmp_path / "bad", "--opt", "preset=nope")
    assert res.code == 1 and "moe-adapters: --opt preset='nope': use one of cil, mtil" in res.err
    recorded = json.loads((run / "config.json").read_text())["config"]["method_options"]
    assert recorded["preset"] == "mtil" and recorded["num_experts"] == 4 and recorded["selector"] is True


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    from llm_server import FakeLLMServer

    pool = tmp_path_factory.mktemp("pool") / "p.duckdb"
    with FakeLLMServer() as server:
        res = run_cli("attrs", "build", "--dataset", "synthetic", "--pool", pool, *server_args(server))
    assert res.code == 0, res.err
    return pool


def test_train_mage_end_to_end(tmp_path, tiny_pool):
    run = tmp_path / "mage"
    res = run_cli("train", *FAST, "--method", "mage", "--pool", tiny_pool, "--out", run, "--opt", "num_experts=4")
    assert res.code == 0, res.err
    m = run_metrics(run)
    assert m.finished_steps == len(m.steps) and m.class_il.last is not None
    stats = m.statistics[-1]
    assert stats["selector"]["test_images"] == sum(m.test_sizes)
    assert stats["top_matched"]["class"] and stats["active_attributes"]["class"] > 0
    res = run_cli("train", *FAST, "--method", "mage", "--pool", tiny_pool, "--out", tmp_path / "plain",
                  "--opt", "num_experts=4", "--opt", "no_attributes=true", "--opt", "attr_kind=class")
    assert res.code == 0, res.err


def test_mage_refuses_to_run_without_a_pool(tmp_path):
    res = run_cli("train", *FAST, "--method", "mage", "--out", tmp_path / "r")
    assert res.code == 1 and "needs an attribute pool" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_mage_ablations_are_options_refused_for_other_methods(tmp_path):
    res = run_cli("train", *FAST, "--method", "finetune", "--opt", "no_attributes=true", "--out", tmp_path / "r")
    assert res.code == 1 and "finetune: unknown option(s) no_attributes; known: templates, adapter_rank" in res.err
    res = run_cli("train", *FAST, "--method", "moe-adapters", "--opt", "beta=0", "--out", tmp_path / "r")
    assert res.code == 1 and "moe-adapters: unknown option(s) beta; known:" in res.err
    res = run_cli("train", *FAST, "--method", "mage", "--no-attributes", "--out", tmp_path / "r")
    assert res.code == 2 and "No such option: --no-attributes" in res.err  # the flag is gone: --opt no_attributes=true
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method, typo", [("finetune", "adapter_rnak"), ("moe-adapters", "num_expert"),
                                          ("mage", "attr_top_k"), ("zeroshot", "prototype")])
def test_a_mistyped_option_is_refused_before_anything_loads(tmp_path, method, typo):
    res = run_cli("train", *FAST, "--method", method, "--opt", f"{typo}=2", "--out", tmp_path / "r")
    assert res.code == 1 and f"{method}: unknown option(s) {typo}; known:" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method, opt, message", [
    ("mage", "selector_quantile=5", "must be between 0 and 1"),
    ("moe-adapters", "num_experts=2.5", "expected a whole number"),
    ("moe-adapters", "ddas_reference=true", "name a dataset"),
    ("finetune", "adapter_rank=wide", "expected a whole number"),
])
def test_bad_option_values_are_one_line_errors(tmp_path, tiny_pool, method, opt, message):
    extra = ["--opt", "preset=mtil"] if opt.startswith("ddas") else []
    res = run_cli("train", *FAST, "--method", method, "--pool", tiny_pool, "--opt", opt, *extra,
                  "--out", tmp_path / "r")
    assert res.code == 1 and message in res.err and "Traceback" not in res.err, res.err
    assert not (tmp_path / "r" / "metrics.json").exists()


@pytest.mark.slow
def test_ddp_statistics_count_every_test_image_once(tmp_path):
    """Under DDP each rank evaluates a shard; the recorded DDAS counts cover the whole test sets."""
    import subprocess
    import sys

    from conftest import free_port

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "uniil.cli", "train", *FAST,
           "--method", "moe-adapters", "--opt", "preset=mtil", "--opt", "num_experts=4", "--opt", "ddas_epochs=2",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = run_metrics(out)
    evaluated = sum(m.test_sizes)  # every step's test set is evaluated after every step
    for stats in m.statistics:
        ddas = stats["ddas"]
        assert sum(ddas["task_counts"]) + ddas["original_clip"] == evaluated
        assert all(stats["text"]["frozen"])  # every text block froze experts under DDP too
