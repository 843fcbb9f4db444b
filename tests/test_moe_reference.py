"""`moe-adapters` as its authors run it: one block of each tower against a plain, loop-based
forward written from reading the original code (JiazuoYu/MoE-Adapters4CL, `cil/clip/model.py`:
`ResidualAttentionBlock.forward`, `noisy_top_k_gating`, `SparseDispatcher`, `adapter.py`), the
text-tower experts and their prototypes, the original's freezing rule, DDAS per batch,
per-dataset templates and learning rates, and the uncapped warm-up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, run_metrics
from moe_fixtures import batch_of, fresh_clip, moe_cache, step_data, train, world  # noqa: F401
from uniil.trainer import checkpoint as ckpt
from uniil.trainer.adapters import RoutingContext
from uniil.trainer.methods.base import RunContext
from uniil.trainer.methods.moe_adapters import MoEAdapters
from uniil.trainer.methods.moe_common import task_router

FAST = ["--scenario", "synthetic-uniil", "--recipe", "none", "--clip-model", "uniil-tiny", "--train-per-class", "4",
        "--test-per-class", "2", "--batch-size", "16"]


def moe_both(world, **options) -> MoEAdapters:
    """moe-adapters as the engine builds it: with the run's classes, so both towers get experts."""
    clip, scenario, vocab, text = world
    context = RunContext(class_names=tuple(vocab.names), class_datasets=tuple(k[0] for k in vocab.keys),
                         templates=("a photo of a {}.",))
    return MoEAdapters(fresh_clip(), text, options, context)


# -- the reference ---------------------------------------------------------------------------------
def original_block(x, block, experts, w_gate, w_noise, top_k, training, attn_mask=None):
    """One MoE-Adapters block computed as the original does, sample by sample and expert by expert.

    x [B, N, d] (batch first). The original: x = x + attn(ln_1(x)); route on token 0 with
    noisy top-k gating (noise only in training: clean + randn * (softplus(x W_noise) + 1e-2)),
    top-(k+1) taken and the first k softmaxed, gates scattered into [B, E]; each expert gets the
    samples whose gate is non-zero and computes scale * up(dropout(relu(down(x)))); outputs are
    weighted by the gates and summed; x = x + mlp(ln_2(x)) + y. Returns (out, gates [B, E])."""
    x = x + block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=False, attn_mask=attn_mask)[0]
    token = x[:, 0, :]
    clean = token @ w_gate
    if training:
        logits = clean + torch.randn_like(clean) * (F.softplus(token @ w_noise) + 1e-2)
    else:
        logits = clean
    num_experts = w_gate.shape[1]
    top_logits, top_indices = logits.topk(min(top_k + 1, num_experts), dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_indices[:, :top_k], torch.softmax(top_logits[:, :top_k], dim=1))
    y = torch.zeros_like(x)
    for e in range(num_experts):
        down_w, down_b = experts.down[e].T, experts.down_bias[e]  # nn.Linear(d, r) as the original holds it
        up_w, up_b = experts.up[e].T, experts.up_bias[e]
        for b in range(x.shape[0]):
            if gates[b, e] > 0:
                h = torch.relu(F.linear(x[b], down_w, down_b))
                y[b] += gates[b, e] * (experts.scale * F.linear(h, up_w, up_b))
    return x + block.mlp(block.ln_2(x)) + y, gates


def _randomise(method: MoEAdapters) -> None:
    """Experts and routers away from their zero initialisation, so that every term counts."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bank in list(method.adapters.banks) + list(method.text_experts.adapters.banks):
            for p in (bank.down, bank.down_bias, bank.up, bank.up_bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for w in list(method.w_gate) + list(method.w_noise) + list(method.text_experts.w_gate) + \
                list(method.text_experts.w_noise):
            w.copy_(torch.randn(w.shape, generator=g))


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("training", [True, False])
def test_a_block_of_each_tower_computes_what_the_original_computes(world, tower, training):
    clip, scenario, vocab, _ = world
    method = moe_both(world, preset="cil", num_experts=5, top_k=2, adapter_dropout=0.0)
    method.begin_step(0, step_data(scenario, vocab, 0))
    _randomise(method)
    method.train(training)
    if tower == "image":
        adapters, router, mask = method.adapters, method._router(0), None
        w_gate, w_noise = method.w_gate[0][0], method.w_noise[0][0]
    else:
        experts = method.text_experts
        adapters, router, mask = experts.adapters, task_router(experts, 0), method.clip.model.attn_mask
        w_gate, w_noise = experts.w_gate[0][0], experts.w_noise[0][0]
    adapted = adapters._blocks[0]
    assert isinstance(adapted.block.ls_1, torch.nn.Identity) and isinstance(adapted.block.ls_2, torch.nn.Identity)
    x = torch.randn(6, 9 if tower == "image" else mask.shape[0], adapters.width, generator=torch.Generator().manual_seed(1))
    ctx = RoutingContext(router, top_k=2)
    with torch.no_grad():
        torch.manual_seed(11)
        with adapters.routing(ctx):
            ours = adapted(x, attn_mask=mask)
        torch.manual_seed(11)  # the same gate noise in training
        expected, gates = original_block(x, adapted.block, adapted.experts, w_gate, w_noise, 2, training, mask)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    weights, indices, _ = ctx.gates[0]
    torch.testing.assert_close(torch.zeros_like(gates).scatter(1, indices, weights), gates)
    assert (gates > 0).sum(1).tolist() == [2] * 6  # top-k: exactly k experts per sample


def test_adapter_dropout_acts_in_training_only(world):
    clip, scenario, vocab, _ = world
    method = moe_both(world, preset="cil")  # the preset's dropout: 0.1, as the original's adapters
    assert method.opts.adapter_dropout == 0.1 and method.adapters.banks[0].dropout.p == 0.1
    assert method.text_experts.adapters.banks[0].dropout.p == 0.1
    data = step_data(scenario, vocab, 0)
    method.begin_step(0, data)
    _randomise(method)
    batch = batch_of(clip, vocab, data)
    with torch.no_grad():
        method.eval()
        assert torch.equal(method.encode(batch), method.encode(batch))  # no dropout, no noise at evaluation
        method.train()
        torch.manual_seed(0)
        a = method.encode(batch)
        torch.manual_seed(0)
        b = method.encode(batch)
        torch.manual_seed(1)
        c = method.encode(batch)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# -- text experts and prototypes -------------------------------------------------------------------
def test_text_prototypes_start_as_the_original_clip_and_then_learn(world):
    clip, scenario, vocab, _ = world
    method = moe_both(world, preset="mtil", num_experts=4)
    text = method.text  # the preset's prompts ("a bad photo of a {}." for the synthetic world)
    assert method.text_experts is not None and method.text_experts.num_layers == 2
    data = step_data(scenario, vocab, 0)
    method.begin_step(0, data)
    method.eval()
    everything = torch.arange(len(vocab.names))
    with torch.no_grad():  # zero-initialised experts: the prototypes are the original CLIP's t_c
        torch.testing.assert_close(method.text_experts.prototypes(0, everything, 2), text, rtol=1e-5, atol=1e-6)
    method.end_step(0, data)
    data, _ = train(method, world, 1, iters=3)
    for p in (method.text_experts.w_gate[1], method.text_experts.adapters.banks[0].up):
        assert p.grad is not None and p.grad.abs().sum() > 0  # the text side trains with the image side
    method.eval()
    with torch.no_grad():
        moved = method.text_experts.prototypes(1, data.classes, 2)
    assert not torch.allclose(moved, text[data.classes], atol=1e-4)
    # router 0's prototypes are not router 1's: each task scores with its own text experts' routing
    with torch.no_grad():
        assert not torch.allclose(method.text_experts.prototypes(0, data.classes, 2), moved, atol=1e-6)


def test_evaluation_encodes_the_prompts_once_per_router(world, monkeypatch):
    clip, scenario, vocab, _ = world
    method = moe_both(world, preset="mtil", num_experts=4, ddas_epochs=2)
    for t in range(2):
        train(method, world, t, iters=2)
    calls = []
    real = method.clip.model.encode_text
    monkeypatch.setattr(method.clip.model, "encode_text", lambda tokens: calls.append(len(tokens)) or real(tokens))
    method.eval()
    with torch.no_grad():
        feats = method.encode(batch_of(clip, vocab, step_data(scenario, vocab, 1)))
    assert feats.shape[1] == clip.dim + 1  # the router column that logits reads
    images = torch.cat([feats[:4, :-1], torch.tensor([[0.0], [1.0], [-1.0], [1.0]])], dim=1)
    classes = step_data(scenario, vocab, 1).seen_classes
    for _ in range(2):
        with torch.no_grad():
            for _ in range(3):
                method.logits(images, classes)
            method.logits(images, classes[:3])  # classes already encoded: nothing more
        assert calls == [len(classes)] * 2  # routers 0 and 1, each class's one prompt once; -1 is the fixed t_c
        method.train()  # training moves the experts: the next evaluation encodes again
        method.eval()
        calls.clear()


def test_logits_use_the_prototypes_of_each_images_router(world):
    clip, scenario, vocab, _ = world
    method = moe_both(world, preset="mtil", num_experts=4, ddas_epochs=2)
    for t in range(2):
        train(method, world, t, iters=2)
    method.eval()
    text = method.text
    feats = torch.nn.functional.normalize(torch.randn(6, clip.dim), dim=-1)
    routers = torch.tensor([0, 1, -1, 1, 0, -1], dtype=torch.float32)
    classes = step_data(scenario, vocab, 1).seen_classes
    with torch.no_grad():
        got = method.logits(torch.cat([feats, routers[:, None]], 1), classes)
        for i, r in enumerate(routers.long().tolist()):
            protos = text[classes] if r < 0 else method.text_experts.prototypes(r, classes, 2)
            torch.testing.assert_close(got[i], 100.0 * feats[i] @ protos.T)


def test_text_experts_freeze_with_the_image_ones(world):
    method = moe_both(world, preset="mtil", num_experts=4, freeze_top=2)
    train(method, world, 0, iters=2)
    text = method.text_experts
    frozen = text.adapters.frozen()
    assert frozen.sum(1).tolist() == [2] * text.num_layers
    assert torch.equal(frozen, torch.zeros_like(frozen).scatter_(1, text.usage.topk(2, dim=1).indices, True))


def test_freeze_rule_all_repicks_frozen_experts_as_the_original(world):
    """rule all: the two most used of all experts are frozen, an already frozen one included, so a
    step may freeze fewer than two new ones; rule trainable always freezes two new ones."""
    from uniil.trainer.adapters import Adapters
    from uniil.trainer.methods.moe_common import freeze_most_used

    for rule, expected in (("all", [[0, 1, 2], [0, 1, 3]]), ("trainable", [[0, 1, 2, 3], [0, 1, 3, 4]])):
        adapters = Adapters(fresh_clip().model, num_experts=5)
        adapters.freeze(torch.tensor([[True, True, False, False, False]] * 2))
        usage = torch.tensor([[9.0, 1.0, 8.0, 2.0, 0.0], [0.0, 7.0, 1.0, 6.0, 2.0]])
        new = freeze_most_used(adapters, usage, 2, 1, rule)
        got = [[e for e, f in enumerate(row) if f] for row in adapters.frozen().tolist()]
        assert got == expected, rule
        assert new == ([[2], [3]] if rule == "all" else [[2, 3], [3, 4]])


# -- DDAS per batch --------------------------------------------------------------------------------
def test_ddas_per_batch_gives_the_whole_batch_one_decision():
    from uniil.trainer.methods.ddas import TaskSelector

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=g) + 2, torch.randn(64, 16, generator=g) - 2
    for decision in ("sample", "batch"):
        sel = TaskSelector(16, hidden=8, epochs=20, decision=decision)
        for t, feats in enumerate((a, b)):
            sel.add_task("cpu")
            sel.fit_task(t, feats, seed=t)
        mixed = torch.cat([a[:5], b[:3]])
        task, on = sel.choose(mixed)
        errors = torch.stack([ae.error(mixed) for ae in sel.tasks], 1)
        if decision == "sample":
            assert torch.equal(task, errors.argmin(1)) and set(task.tolist()) == {0, 1}
        else:
            best = int(errors.mean(0).argmin())
            assert task.tolist() == [best] * 8 and len(set(on.tolist())) == 1
            threshold = float(sel.tasks[best].threshold)
            assert bool(on[0]) == (float(errors.mean(0)[best]) <= threshold)
    sel = TaskSelector(16, hidden=8, epochs=2, threshold=1e-9, decision="batch")  # the absolute threshold
    sel.add_task("cpu")
    sel.fit_task(0, a, seed=0)
    assert not sel.choose(a[:8])[1].any()  # nothing reconstructs that well: the original CLIP


# -- MTIL: per-dataset templates and learning rates; the warm-up -----------------------------------
def test_dataset_templates_make_each_classes_prompts_from_its_dataset(world):
    from uniil.attrpool.zeroshot import class_text_embeddings
    from uniil.data.prompt_templates import DATASET_TEMPLATES

    clip = fresh_clip()
    names, datasets = ("boeing 737", "zero", "circle"), ("aircraft", "mnist", "synthetic")
    context = RunContext(class_names=names, class_datasets=datasets, templates=("a bad photo of a {}.",))
    text = torch.from_numpy(class_text_embeddings(clip, list(names), ["a bad photo of a {}."]))
    method = MoEAdapters(clip, text, {"preset": "mtil", "num_experts": 4}, context)
    for i, (name, dataset) in enumerate(zip(names, datasets)):
        own = DATASET_TEMPLATES.get(dataset, ["a bad photo of a {}."])
        want = torch.from_numpy(class_text_embeddings(clip, [name], own))[0]
        torch.testing.assert_close(method.text[i], want, rtol=1e-5, atol=1e-6)
        first = clip.tokenizer([own[0].format(name)])[0]
        experts = method.text_experts
        assert torch.equal(experts.tokens[experts.first[i]], first)  # training encodes the first template
        assert int((experts.owner == i).sum()) == len(own)  # evaluation: every template, no padding
    method.begin_step(0, step_of("aircraft"))
    method.eval()
    with torch.no_grad():  # zero-initialised text experts: the mean over each class's own templates
        got = method.text_experts.prototypes(0, torch.arange(3), 2)
    torch.testing.assert_close(got, method.text, rtol=1e-5, atol=1e-5)
    assert method.learning_rate(step_of("aircraft"), 1e-3) == 5e-3
    assert method.learning_rate(step_of("mnist"), 1e-3) == 1e-4
    assert method.learning_rate(step_of("synthetic"), 1e-3) == 1e-3


def step_of(dataset: str):
    from types import SimpleNamespace

    return SimpleNamespace(step=SimpleNamespace(dataset=dataset))


def test_per_dataset_learning_rates_reach_the_optimiser(tmp_path):
    """A run whose datasets all get lr 1e-9 through dataset_lrs equals a run at --lr 1e-9."""
    lrs = "synthetic=1e-9,synthetic-digits=1e-9,synthetic-patterns=1e-9"
    a = run_cli("train", *FAST, "--method", "moe-adapters", "--lr", "1e-2", "--opt", f"dataset_lrs={lrs}",
                "--out", tmp_path / "a")
    b = run_cli("train", *FAST, "--method", "moe-adapters", "--lr", "1e-9", "--out", tmp_path / "b")
    c = run_cli("train", *FAST, "--method", "moe-adapters", "--lr", "1e-2", "--out", tmp_path / "c")
    assert a.code == 0 and b.code == 0 and c.code == 0, a.err + b.err + c.err
    weights = {run: ckpt.load_step(tmp_path / run, 6)[0] for run in "abc"}
    for name, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["b"][name]), name
    assert any(not torch.equal(t, weights["c"][k]) for k, t in weights["a"].items())  # --lr 1e-2 was overridden
    assert [s["lr"] for s in run_metrics(tmp_path / "a").statistics] == [1e-9] * 7
    bad = run_cli("train", *FAST, "--method", "moe-adapters", "--opt", "dataset_lrs=aircraft:5e-3",
                  "--out", tmp_path / "d")
    assert bad.code == 1 and "DATASET=LR" in bad.err and "Traceback" not in bad.err


def test_a_given_warmup_is_not_capped():
    from uniil.trainer.engine import effective_warmup, lr_factor

    assert effective_warmup(None, 40) == 10 and effective_warmup(None, 400) == 30  # the default, capped
    assert effective_warmup(100, 40) == 100  # given: as given (MoE-Adapters' MTIL uses 100)
    assert [round(lr_factor(i, 4, 2), 3) for i in range(4)] == [0.5, 1.0, 1.0, 0.5]


def test_towers_both_is_refused_where_the_text_tower_is_not_open_clip(tmp_path):
    res = run_cli("train", "--scenario", "synthetic-uniil", "--recipe", "none", "--clip-model", "uniil-micro",
                  "--method", "moe-adapters", "--opt", "towers=both", "--out", tmp_path / "r")
    assert res.code == 1 and "towers=image" in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1


# -- the text side keeps the image side's guarantees -----------------------------------------------
def _text_ops(world, num_experts: int) -> list[str]:
    from torch.overrides import TorchFunctionMode

    clip, scenario, vocab, _ = world
    method = moe_both(world, num_experts=num_experts, top_k=2)
    method.begin_step(0, step_data(scenario, vocab, 0))
    method.train()
    names = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record():
        method.text_experts.prototypes(0, torch.arange(8), 2).sum().backward()
    return names


def test_text_experts_have_no_host_sync_and_no_loop_over_experts(world):
    few, many = _text_ops(world, 4), _text_ops(world, 32)
    assert few == many
    assert not {"item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "unique"} & set(many)


def test_text_experts_train_under_bf16_autocast(world):
    clip, scenario, vocab, _ = world
    method = moe_both(world, num_experts=4)
    data = step_data(scenario, vocab, 0)
    method.begin_step(0, data)
    method.train()
    batch = batch_of(clip, vocab, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(batch, data)
    loss.backward()
    assert torch.isfinite(loss) and method.text_experts.w_gate[0].grad is not None


def test_runs_recorded_with_the_old_default_warmup_still_resume(tmp_path):
    """Earlier versions recorded the (capped) default as warmup 30: the same run as no --warmup now,
    and not the same as a given --warmup 30, which is no longer capped."""
    from uniil.trainer.config import TrainConfig

    cfg = TrainConfig("synthetic-uniil", "finetune", tmp_path)
    old = {k: v for k, v in cfg.identity().items() if k != "warmup_rule"} | {"warmup": 30}  # capped 30
    assert cfg.identity_against(old, lambda o: o, lambda: "v") == old
    for warmup in (30, 100):  # given now: uncapped, another schedule than the old run's
        given = TrainConfig("synthetic-uniil", "finetune", tmp_path, warmup=warmup)
        assert given.identity_against(old, lambda o: o, lambda: "v") != old
    # a new run given --warmup 30 (uncapped) is not the default (capped) run
    new = TrainConfig("synthetic-uniil", "finetune", tmp_path, warmup=30).identity()
    assert cfg.identity_against(new, lambda o: o, lambda: "v") != new


def test_checkpoint_round_trip_with_text_experts(world):
    """What a resumed run does: replay begin_step for finished steps, load the state, go on."""
    clip, scenario, vocab, _ = world
    method = moe_both(world, preset="mtil", num_experts=4, ddas_epochs=2)
    for t in range(2):
        train(method, world, t)
    tensors = method.trainable_state()
    torch.manual_seed(123)
    again = moe_both(world, preset="mtil", num_experts=4, ddas_epochs=2)
    for t in range(2):
        again.begin_step(t, step_data(scenario, vocab, t))
    again.load_trainable_state(tensors)
    data = step_data(scenario, vocab, 2)
    batch = batch_of(clip, vocab, data)
    for m in (method, again):
        m.begin_step(2, data)
        m.eval()
    with torch.no_grad():
        a, b = method.encode(batch), again.encode(batch)
        assert torch.equal(a, b)
        assert torch.equal(method.logits(a, data.seen_classes), again.logits(b, data.seen_classes))
    assert torch.equal(method.text_experts.adapters.frozen(), again.text_experts.adapters.frozen())


def test_a_misspelt_dataset_in_dataset_lrs_is_refused():
    from uniil.errors import UserError

    with pytest.raises(UserError, match="unknown dataset.*aircaft"):
        MoEAdapters.parse_options({"dataset_lrs": "aircaft=5e-3"})
    assert MoEAdapters.parse_options({"preset": "mtil"}).dataset_lrs.startswith("aircraft=5e-3")
