"""`moe-adapters` and `mage` as methods: top-k gating, zero-initialised experts, the balancing
loss, frozen experts, per-task routers, mage without attributes = a shared-router MoE, the active
pool, prototypes and anchoring, and checkpoint round trips after replayed begin_steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_fixtures import batch_of, fresh_clip, mage, moe, moe_cache, step_data, train, world  # noqa: F401
from uniil.trainer.adapters import Adapters, RoutingContext, noisy_logits


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding: two code paths (or x + 0 * y) may differ in the last bits on
    some CPUs' kernels. Far tighter than any effect tested here (trained experts move outputs ~1e-2)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# -- gating --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, options", [(moe, {"preset": "mtil", "num_experts": 6}), (mage, {"num_experts": 6})])
def test_gating_picks_exactly_top_k_and_gates_sum_to_one(world, make, options):
    clip, scenario, vocab, _ = world
    method = make(world, **options)
    data = step_data(scenario, vocab, 0)
    method.begin_step(0, data)
    method.train()
    method(batch_of(clip, vocab, data), data).backward()
    gates = method.last_context.gates
    assert len(gates) == method.adapters.num_layers
    for weights, indices, logits in gates:
        assert weights.shape == indices.shape == (8, 2)
        assert torch.allclose(weights.sum(-1), torch.ones(8))
        assert (indices[:, 0] != indices[:, 1]).all()
        assert torch.equal(indices, logits.topk(2, dim=-1).indices)
    assert method.usage.sum() == 8 * 2 * method.adapters.num_layers


def test_gate_noise_only_in_training():
    clean, noise = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(noisy_logits(clean, noise, training=False), clean)
    assert not torch.equal(noisy_logits(clean, noise, training=True), clean)


@pytest.mark.parametrize("make", [moe, mage])
def test_zero_initialised_experts_leave_the_backbone_output_unchanged(world, make):
    clip, scenario, vocab, _ = world
    data = step_data(scenario, vocab, 0)
    batch = batch_of(clip, vocab, data)
    with torch.no_grad():
        before = F.normalize(clip.model.encode_image(batch.images).float(), dim=-1)
        method = make(world, num_experts=4)
        method.begin_step(0, data)
        method.train()  # noisy routing, every sample through its experts
        # Arithmetic on another code path (the wrapper's own block forward): equal up to rounding.
        close(method.encode(batch), before)
        method.eval()
        close(method.encode(batch), before)


def test_load_balancing_loss_is_part_of_the_training_loss(world):
    clip, scenario, vocab, _ = world
    data = step_data(scenario, vocab, 0)
    batch = batch_of(clip, vocab, data)
    losses = []
    for weight in (0.0, 1.0):
        method = moe(world, preset="mtil", num_experts=6, lb_weight=weight)
        method.begin_step(0, data)
        method.train()
        torch.manual_seed(1)
        losses.append(float(method(batch, data).detach()))
    assert losses[1] > losses[0]


# -- freezing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [moe, mage])
def test_frozen_experts_do_not_change_across_a_step(world, make):
    method = make(world, preset="mtil", num_experts=6, freeze_top=2, freeze_rule="trainable") if make is moe else \
        make(world, num_experts=6)
    train(method, world, 0, weight_decay=0.1)
    frozen = method.adapters.frozen()
    assert frozen.sum(1).tolist() == [2] * method.adapters.num_layers
    # the frozen experts are the two the step used most
    assert torch.equal(frozen, torch.zeros_like(frozen).scatter_(1, method.usage.topk(2, dim=1).indices, True))
    before = [[p.detach().clone() for p in (b.down, b.down_bias, b.up, b.up_bias)] for b in method.adapters.banks]
    train(method, world, 1, iters=4, weight_decay=0.1)  # weight decay would move them if they were trainable
    for bank, old, mask in zip(method.adapters.banks, before, frozen):
        for p, q in zip((bank.down, bank.down_bias, bank.up, bank.up_bias), old):
            assert torch.equal(p[mask], q[mask])
            assert not torch.equal(p[~mask], q[~mask])
    assert method.adapters.frozen().sum(1).tolist() == [4] * method.adapters.num_layers


def test_moe_adapters_has_one_router_per_task_and_trains_only_the_current_one(world):
    method = moe(world, preset="mtil", num_experts=4)
    train(method, world, 0)
    first = method.w_gate[0].detach().clone()
    assert first.abs().sum() > 0  # the router learned
    train(method, world, 1)
    assert len(method.w_gate) == 2 and torch.equal(method.w_gate[0], first)
    assert [p.requires_grad for p in method.w_gate] == [False, True]


# -- mage ----------------------------------------------------------------------------------------
def test_mage_without_attributes_equals_a_shared_router_moe(world):
    clip, scenario, vocab, text = world
    method = mage(world, num_experts=4, no_attributes=True, no_selector=True, router_init=3.0)
    data, batch = train(method, world, 0)  # trained experts and router: a non-trivial comparison
    reference_clip = fresh_clip()
    reference = Adapters(reference_clip.model, num_experts=4)
    reference.load_state_dict(method.adapters.state_dict())
    w, w_noise = method.w.detach(), method.w_noise.detach()

    def route(training):
        return lambda layer, cls: noisy_logits(cls @ w[layer], cls @ w_noise[layer], training)

    with torch.no_grad():
        with reference.routing(RoutingContext(route(False), 2)):
            expected = F.normalize(reference_clip.model.encode_image(batch.images).float(), dim=-1)
        close(method.encode(batch), expected)
        method.train()
        torch.manual_seed(5)
        got = method.encode(batch)
        torch.manual_seed(5)
        with reference.routing(RoutingContext(route(True), 2)):
            expected = F.normalize(reference_clip.model.encode_image(batch.images).float(), dim=-1)
        close(got, expected)


def test_mage_attributes_steer_the_router(world):
    clip, scenario, vocab, _ = world
    method = mage(world, num_experts=8, router_init=1.0)
    data = step_data(scenario, vocab, 0)
    method.begin_step(0, data)
    batch = batch_of(clip, vocab, data)
    z, _, _ = method._attributes(batch)
    assert z.abs().sum() > 0 and z.shape == (8, 2 * clip.dim)
    # only attributes of seen classes and domains are active at the first step
    step = scenario.steps[0]
    active = {s for i in method.matcher.active_ids.tolist() for s in method.matcher.pool.sources[i]}
    assert active <= set(step.classes) | {step.domain}
    assert method._anchoring() == 0  # nothing old to anchor yet


def test_mage_prototypes_and_anchoring(world, caplog):
    clip, scenario, vocab, text = world
    method = mage(world, num_experts=4, beta=1.0)
    train(method, world, 0)
    assert "'circle' has no attributes" in caplog.text
    circle = vocab.names.index("circle")
    close(method.text[circle], text[circle])  # no attributes: plain prototype
    other = vocab.names.index(scenario.steps[0].classes[1])
    assert not torch.allclose(method.text[other], text[other])
    assert torch.allclose(method.text.norm(dim=-1), torch.ones(len(text)))
    assert np.isfinite(float(method.theta))
    data = step_data(scenario, vocab, 1)
    method.begin_step(1, data)
    assert len(method._anchors) == len(scenario.steps[0].classes)
    with torch.no_grad():
        method.u.add_(0.1)
    assert method._anchoring() > 0
    flat = mage(world, num_experts=4, beta=0.0)
    flat.begin_step(0, step_data(scenario, vocab, 0))
    close(flat.text, text)  # normalise(t + 0 * mean): t up to the CPU's rounding


def test_mage_routes_on_frozen_features_and_anchors_w_on_old_prototypes(world):
    """router_input=frozen: a block's router ignores its adapted token (old images keep their route
    whatever the experts learn since); anchor_w anchors W on the old classes' prototypes."""
    from uniil.errors import UserError

    clip, scenario, vocab, text = world
    with pytest.raises(UserError, match="anchor_w=true needs --opt router_input=frozen"):
        mage(world, num_experts=4, anchor_w=True)
    method = mage(world, num_experts=4, router_input="frozen", anchor_w=True, anchor=1.0)
    assert method.w.shape == (method.adapters.num_layers, clip.dim, 4)
    train(method, world, 0)
    data = step_data(scenario, vocab, 1)
    method.begin_step(1, data)
    batch = batch_of(clip, vocab, data)
    z, _, frozen = method._attributes(batch)
    route = method._router(z, frozen)
    method.eval()
    token = torch.randn(len(z), method.adapters.width)
    with torch.no_grad():
        close(route(0, token), route(0, token * 3 + 1))  # the token does not matter
        assert not torch.allclose(route(0, token), route(1, token))  # each block its own W and U
    old = sorted(step_data(scenario, vocab, 0).classes.tolist())
    close(method._w_anchors, method.text[old].float())
    before = float(method._anchoring().detach())
    with torch.no_grad():
        method.w.add_(0.1)
    assert float(method._anchoring().detach()) > before
    plain = mage(world, num_experts=4, router_input="frozen", anchor=1.0)  # W free without anchor_w
    train(plain, world, 0)
    plain.begin_step(1, data)
    before = float(plain._anchoring().detach())
    with torch.no_grad():
        plain.w.add_(0.1)
    assert float(plain._anchoring().detach()) == pytest.approx(before)


def test_mage_experts_read_the_attribute_feature(world):
    """expert_attributes: each bank carries Cond [E, 2D, r] (zero at first: the plain model), the
    routing context hands the experts z, and training moves Cond."""
    clip, scenario, vocab, text = world
    plain, method = mage(world, num_experts=4), mage(world, num_experts=4, expert_attributes=True)
    assert plain.adapters.banks[0].cond is None
    assert method.adapters.banks[0].cond.shape == (4, 2 * clip.dim, method.opts.adapter_rank)
    data = step_data(scenario, vocab, 0)
    batch = batch_of(clip, vocab, data)
    with torch.no_grad():
        method.begin_step(0, data)
        before = F.normalize(clip.model.encode_image(batch.images).float(), dim=-1)
        close(method.encode(batch), before)  # zero Up and Cond: the backbone's output
    z, _, _ = method._attributes(batch)
    assert torch.equal(method.last_context.condition, z)
    torch.manual_seed(1)
    train(method, world, 0, iters=5)
    assert all(bank.cond.abs().sum() > 0 for bank in method.adapters.banks)


def test_mage_novelty_opens_reserved_experts_and_freezes_the_rest(world):
    """novelty_reserve=2 of 4 experts: the router never picks a closed expert; a novel step opens
    top_k of them and freezes the others, so it trains only fresh experts; a resumed run (begin_step
    replayed without data, then the checkpoint) keeps the decision."""
    from uniil.errors import UserError

    with pytest.raises(UserError, match="novelty_reserve=3 leaves fewer than top_k=2"):
        mage(world, num_experts=4, novelty_reserve=3)
    clip, scenario, vocab, text = world
    options = {"num_experts": 4, "novelty_reserve": 2, "novelty_threshold": 0.0}  # threshold 0: every step novel
    assert "closed" not in mage(world, num_experts=4).trainable_state()  # without a reserve: checkpoints as before
    method = mage(world, **options)
    assert method.closed.tolist() == [False, False, True, True]
    train(method, world, 0)
    for _, indices, _ in method.last_context.gates:
        assert (indices < 2).all()  # closed experts are never routed to
    assert method.adapters.frozen_experts() == [[]] * method.adapters.num_layers  # 2 open = top_k: none frozen
    assert "novelty" not in method.statistics()  # the first step is never measured
    before = [bank.down.detach().clone() for bank in method.adapters.banks]
    train(method, world, 1)
    assert method.closed.tolist() == [False] * 4
    assert method.adapters.frozen_experts() == [[0, 1]] * method.adapters.num_layers
    stats = method.statistics()
    assert stats["opened"] == [2, 3] and 0 <= stats["novelty"] <= 1
    for bank, old in zip(method.adapters.banks, before):
        assert torch.equal(bank.tensors()[0][:2], old[:2]) and not torch.equal(bank.down[2:], old[2:])
    strict = mage(world, **{**options, "novelty_threshold": 1.0})  # no step has every image unexplained
    train(strict, world, 0)
    train(strict, world, 1)
    assert strict.closed.tolist() == [False, False, True, True] and strict.statistics()["opened"] == []
    torch.manual_seed(123)
    again = mage(world, **options)
    for t in range(2):
        again.begin_step(t, dataclasses.replace(step_data(scenario, vocab, t), train_source=None))
    again.load_trainable_state(method.trainable_state())
    again.load_extra_state(method.extra_state())
    assert torch.equal(again.closed, method.closed) and torch.equal(again.adapters.frozen(), method.adapters.frozen())


@pytest.mark.parametrize("make", [moe, mage])
def test_checkpoint_round_trip_after_replayed_begin_steps(world, make):
    """What a resumed run does: replay begin_step for finished steps, load the state, go on."""
    options = {"preset": "mtil", "num_experts": 4} if make is moe else {"num_experts": 4, "router_input": "frozen",
                                                                        "anchor_w": True, "expert_attributes": True}
    method = make(world, **options)
    train(method, world, 0)
    train(method, world, 1)
    tensors, extra = method.trainable_state(), method.extra_state()
    clip, scenario, vocab, text = world
    torch.manual_seed(123)  # another initialisation
    again = make(world, **options)
    for t in range(2):
        again.begin_step(t, step_data(scenario, vocab, t))
    again.load_trainable_state(tensors)
    again.load_extra_state(extra)
    data = step_data(scenario, vocab, 2)
    for m in (method, again):
        m.begin_step(2, data)
        m.eval()
    batch = batch_of(clip, vocab, data)
    with torch.no_grad():
        assert torch.equal(method.encode(batch), again.encode(batch))
    assert torch.equal(method.text, again.text)


@pytest.mark.parametrize("make", ["finetune", "moe-adapters", "mage"])
def test_train_vocab_seen_puts_every_seen_class_into_the_loss(world, make):
    """`train_vocab=step` (the default, MoE-Adapters' code): cross-entropy over the step's classes;
    `seen`: over every class seen so far, so old classes' prototypes are negatives too."""
    from uniil.trainer.methods.finetune import Finetune

    clip, scenario, vocab, text = world
    data = step_data(scenario, vocab, 3)  # digits after 16 shapes: 10 classes of 26 seen
    assert len(data.classes) == 10 and len(data.seen_classes) == 26
    losses = {}
    for choice in ("step", "seen"):
        if make == "finetune":
            method = Finetune(fresh_clip(), text, {"train_vocab": choice})
        elif make == "moe-adapters":
            method = moe(world, train_vocab=choice)
        else:
            method = mage(world, train_vocab=choice)
        for t in range(4):
            method.begin_step(t, step_data(scenario, vocab, t))
        method.eval()
        batch = batch_of(clip, vocab, data)
        with torch.no_grad():
            feats = method.encode(batch)
            losses[choice] = float(method.classification_loss(feats, batch, data))
            for vocab_t in ((data.classes,) if choice == "step" else (data.seen_classes,)):
                logits = method.logits(feats, vocab_t)
                want = torch.nn.functional.cross_entropy(logits, method.positions(batch.targets, vocab_t))
                assert losses[choice] == pytest.approx(float(want), rel=1e-5)
    assert losses["seen"] > losses["step"]  # more negatives: a larger loss on the same logits


def test_trainable_share_is_the_steps_routing_into_experts_it_could_train(world):
    """The first step trains every expert (share 1); after the most used freeze, the share is what
    went to the others, as a user would compute it from the recorded usage and frozen lists."""
    method = mage(world, num_experts=4, top_k=2, freeze_top=2)
    train(method, world, 0)
    first = method.statistics()
    assert first["trainable_share"] == [1.0] * method.adapters.num_layers
    train(method, world, 1)
    usage = torch.tensor(method.statistics()["usage"], dtype=torch.float)
    for share, row, frozen_before in zip(method.statistics()["trainable_share"], usage, first["frozen"]):
        open_ = [e for e in range(4) if e not in frozen_before]
        assert len(open_) == 2 and share == pytest.approx(float(row[open_].sum() / row.sum()), abs=1e-3)


def test_trainable_floor_is_a_hinge_on_the_gate_mass_of_trainable_experts(world):
    """The loss is mean over blocks and images of relu(floor - softmax mass on this step's
    trainable experts); 0 when off; training with it moves a step's routing onto those experts."""
    clip, scenario, vocab, _ = world
    shares = {}
    for floor in (0.0, 0.9):
        torch.manual_seed(0)
        method = mage(world, num_experts=4, top_k=2, freeze_top=2, trainable_floor=floor)
        train(method, world, 0)
        data = step_data(scenario, vocab, 1)
        method.begin_step(1, data)
        method.train()
        method(batch_of(clip, vocab, data), data)
        ctx, mine = method.last_context, method.trainable_now.float()
        assert mine.sum(1).tolist() == [2.0] * method.adapters.num_layers  # 2 of 4 frozen after step 0
        expected = torch.stack([F.relu(floor - (logits.softmax(-1) * mine[i]).sum(-1)).mean()
                                for i, (_, _, logits) in enumerate(ctx.gates)]).mean()
        close(method._capacity(ctx).detach(), expected.detach())
        method.eval()
        method.end_step(1, data)
        torch.manual_seed(1)
        train(method, world, 1, iters=10)  # step 1 again from here: the same for both floors
        shares[floor] = float(np.mean(method.statistics()["trainable_share"]))
    assert shares[0.9] > shares[0.0], shares
