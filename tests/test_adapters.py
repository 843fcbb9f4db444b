"""The MoE adapter layer in open_clip's image tower: zero-initialised experts change nothing, the
backbone stays bit-identical, top-k gating, and the batched dispatch equals a per-expert loop."""

from __future__ import annotations

import pytest
import torch

from uniil.backbones.factory import load_backbone
from uniil.backbones.spec import BackboneSpec
from uniil.trainer.adapters import Adapters, ExpertBank, RoutingContext, load_balancing_loss


@pytest.fixture
def clip():
    return load_backbone(BackboneSpec.from_options("uniil-tiny", None))


def _images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_zero_initialised_experts_leave_the_backbone_output_unchanged(clip):
    x = _images()
    with torch.no_grad():
        before = clip.model.encode_image(x)
        adapters = Adapters(clip.model, num_experts=4)
        router = lambda layer, cls: torch.randn(cls.shape[0], 4)  # noqa: E731
        with adapters.routing(RoutingContext(router, top_k=2)):
            after = clip.model.encode_image(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)  # x + 0, through the wrapper's own forward


def test_training_adapters_never_touches_the_frozen_backbone(clip):
    frozen = {k: v.clone() for k, v in clip.model.state_dict().items()}
    with torch.no_grad():
        original = clip.model.encode_image(_images())
    adapters = Adapters(clip.model, num_experts=1)
    opt = torch.optim.SGD(adapters.parameters(), lr=0.5)
    for _ in range(3):
        with adapters.routing(RoutingContext()):
            loss = clip.model.encode_image(_images()).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    blocks = clip.model.visual.transformer.resblocks
    now = {k.replace(".block.", "."): v for k, v in clip.model.state_dict().items() if ".experts." not in k}
    assert set(now) == set(frozen) and all(torch.equal(now[k], frozen[k]) for k in frozen)
    assert any(p.abs().sum() > 0 for b in blocks for p in [b.experts.up])  # the adapters did learn
    with torch.no_grad(), adapters.routing(None):  # adapters off: the original CLIP again
        assert torch.equal(clip.model.encode_image(_images()), original)


def test_top_k_gates_pick_k_experts_and_sum_to_one(clip):
    adapters = Adapters(clip.model, num_experts=6)
    ctx = RoutingContext(lambda layer, cls: torch.randn(cls.shape[0], 6), top_k=2)
    with torch.no_grad(), adapters.routing(ctx):
        clip.model.encode_image(_images(5))
    assert len(ctx.gates) == adapters.num_layers
    for weights, indices, logits in ctx.gates:
        assert weights.shape == indices.shape == (5, 2)
        assert torch.allclose(weights.sum(-1), torch.ones(5))
        assert torch.equal(indices, logits.topk(2, dim=-1).indices)
        assert (indices[:, 0] != indices[:, 1]).all()
    assert load_balancing_loss(ctx.gates, 6) >= 0


@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("strategy", ["forward", "_gathered", "_grouped"])
@pytest.mark.parametrize("tokens", [7, 70])
def test_batched_dispatch_equals_a_loop_over_experts(strategy, tokens, conditioned):
    """Conditioned banks (mage's expert_attributes): h = ReLU(x Down_e + b_e + c Cond_e)."""
    torch.manual_seed(0)
    bank = ExpertBank(16, 5, rank=4, scale=0.1, cond_dim=3 if conditioned else 0)
    for p in (bank.up, bank.up_bias, bank.down_bias) + ((bank.cond,) if conditioned else ()):
        torch.nn.init.normal_(p)
    x = torch.randn(3, tokens, 16)
    c = torch.randn(3, 3) if conditioned else None
    weights = torch.rand(3, 2).softmax(-1)
    indices = torch.tensor([[0, 4], [2, 1], [3, 0]])
    expected = torch.zeros_like(x)
    for b in range(3):
        for k in range(2):
            e = int(indices[b, k])
            pre = x[b] @ bank.down[e] + bank.down_bias[e] + (c[b] @ bank.cond[e] if conditioned else 0)
            expected[b] += weights[b, k] * 0.1 * (torch.relu(pre) @ bank.up[e] + bank.up_bias[e])
    if strategy == "forward":
        got = bank(x, weights, indices, c)
    else:
        shift = bank._condition_shift(c, bank.tensors(), x)
        got = getattr(bank, strategy)(x, 0.1 * weights, indices, bank.tensors()[:4], shift)
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_conditioned_bank_needs_its_condition_and_freezes_it_with_the_expert():
    torch.manual_seed(0)
    dense = ExpertBank(8, 1, rank=4, cond_dim=2)
    torch.nn.init.normal_(dense.up)
    torch.nn.init.normal_(dense.cond)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 2)
    ones, zeros = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)
    pre = x @ dense.down[0] + dense.down_bias[0] + (c @ dense.cond[0])[:, None]
    torch.testing.assert_close(dense(x, ones, zeros, c), 0.1 * (torch.relu(pre) @ dense.up[0] + dense.up_bias[0]))
    with pytest.raises(ValueError, match="must carry a condition"):
        dense(x, ones, zeros)
    bank = ExpertBank(8, 3, rank=4, cond_dim=2)
    torch.nn.init.normal_(bank.up)  # (zero Up: no gradient reaches any Down or Cond)
    bank.freeze(torch.tensor([True, False, False]))
    out = bank(x, torch.ones(2, 2) / 2, torch.tensor([[0, 1], [0, 2]]), c)
    out.sum().backward()
    assert bank.cond.grad[0].abs().sum() == 0 and bank.cond.grad[1:].abs().sum() > 0  # no gradient into a frozen one


def test_adapters_run_under_bf16_autocast(clip):
    adapters = Adapters(clip.model, num_experts=4)
    ctx = RoutingContext(lambda layer, cls: torch.randn(cls.shape[0], 4), top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters.routing(ctx):
        out = clip.model.encode_image(_images())
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and adapters.banks[0].down.grad is not None
