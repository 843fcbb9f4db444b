"""What `moe-adapters` and `mage` share: the expert layers in the image tower, expert usage per
step, freezing of the most-used experts after a step, and a look-up of each image's frozen CLIP
feature (the input of the DDAS autoencoders and of attribute matching)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ..adapters import Adapters, RoutingContext, expert_usage, load_balancing_loss, noisy_logits
from ..sources import cached_features
from .base import Batch, ContinualMethod, label_smoothing_option, train_vocab_option, opt

log = logging.getLogger(__name__)


def summed_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Evaluation counts summed over DDP ranks (each rank evaluates a shard of every test set).
    Every rank must call it, with the same shape."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


FREEZE_RULES = ("trainable", "all")


def freeze_most_used(adapters: Adapters, usage: torch.Tensor, n: int, top_k: int, rule: str,
                     closed: torch.Tensor | None = None) -> list[list[int]]:
    """After a step, freeze experts of each block by this step's training usage [L, E].

    rule "trainable" (ours): the n most used of the still trainable experts, keeping at least top_k
    trainable, so every step freezes n new ones while it can. rule "all" (the original's): the n
    most used of all experts, a frozen one included (then fewer are newly frozen), with no floor
    on what stays trainable. `closed` [E]: experts the router cannot pick yet (mage's reserve),
    neither frozen nor counted as trainable. Returns the newly frozen experts per block."""
    adapters.restore_frozen()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(usage)  # every rank freezes the same experts
    frozen = adapters.frozen()
    closed = torch.zeros_like(frozen) if closed is None else closed.to(frozen.device).expand_as(frozen)
    if rule == "all":
        n = min(n, int((~closed).sum(1).min()))
        picked = usage.masked_fill(closed, -1.0).topk(n, dim=1).indices if n > 0 else \
            usage.new_zeros(len(frozen), 0, dtype=torch.long)
    else:
        n = min(n, int((~frozen & ~closed).sum(1).min()) - top_k)
        if n <= 0:
            return [[] for _ in range(len(frozen))]
        picked = usage.masked_fill(frozen | closed, -1.0).topk(n, dim=1).indices
    mask = torch.zeros_like(frozen).scatter_(1, picked, True)
    adapters.freeze(mask)
    return [[e for e in row if not was[e]] for row, was in zip(picked.tolist(), frozen.tolist())]


def grow_task_routers(w_gate: nn.ParameterList, w_noise: nn.ParameterList, count: int, shape: tuple[int, ...],
                      device) -> int:
    """Zero-initialised (W_g, W_noise) router pairs [L, d, E] up to `count`; only the newest trains.
    Returns its index (the current router)."""
    while len(w_gate) < count:
        w_gate.append(nn.Parameter(torch.zeros(*shape, device=device)))
        w_noise.append(nn.Parameter(torch.zeros(*shape, device=device)))
    current = len(w_gate) - 1
    for i, (g, n) in enumerate(zip(w_gate, w_noise)):
        g.requires_grad_(i == current)
        n.requires_grad_(i == current)
    return current


def task_router(owner: nn.Module, task: int | torch.Tensor):
    """Noisy top-k gate logits (noise in training only) from `owner`'s router pairs `w_gate`/`w_noise`:
    router `task` (an int) for every input, or each input's own router (a [B] tensor; evaluation)."""
    def route(layer: int, token: torch.Tensor) -> torch.Tensor:
        if isinstance(task, int):
            clean = token @ owner.w_gate[task][layer].to(token.dtype)
            noise = token @ owner.w_noise[task][layer].to(token.dtype)
        else:
            gates = torch.stack([w[layer] for w in owner.w_gate])  # [T, d, E]
            clean = torch.einsum("bd,tde->bte", token, gates.to(token.dtype))
            clean = clean.gather(1, task.view(-1, 1, 1).expand(-1, 1, clean.shape[-1])).squeeze(1)
            noise = clean  # evaluation only: no noise
        return noisy_logits(clean.float(), noise.float(), owner.training)
    return route


class FrozenFeatures:
    """L2-normalised frozen CLIP image features of a batch: from the on-disk cache of its source
    (computed once per dataset split, then a gather), or, for sources that cannot be cached, by
    running the image tower with the adapters off."""

    def __init__(self, clip, adapters: Adapters):
        self.clip, self.adapters = clip, adapters
        self._by_source: dict[str, torch.Tensor] = {}

    def __call__(self, batch: Batch) -> torch.Tensor:
        device = batch.targets.device
        key = getattr(batch.source, "cache_key", None)
        if key is None:
            with torch.no_grad(), self.adapters.routing(None):
                return F.normalize(self.clip.model.encode_image(batch.images).float(), dim=-1)
        if key not in self._by_source:
            self._by_source[key] = cached_features(batch.source, self.clip.spec, str(self.clip.device))
        return self._by_source[key][batch.index.cpu()].to(device, non_blocking=True)

    def of_source(self, source) -> torch.Tensor:
        """Every image of a source: [N, D] on CPU (cached on disk when the source can be)."""
        if getattr(source, "cache_key", None) is None:
            with self.adapters.routing(None):  # outside a routing context the blocks are the original ones
                return torch.from_numpy(self.clip.encode_images([source.load(i) for i in range(len(source))]))
        return cached_features(source, self.clip.spec, str(self.clip.device))


class MoEMethod(ContinualMethod):
    """A continual method whose image tower carries E experts per block, routed top-k."""

    @dataclass(frozen=True)
    class Options(ContinualMethod.Options):
        num_experts: int = opt(2, "experts E per image-tower block", minimum=1)
        top_k: int = opt(2, "experts each image is routed to, per block (at most num_experts)", minimum=1)
        lb_weight: float = opt(0.01, "weight of the load-balancing loss", minimum=0)
        freeze_top: int = opt(2, "most-used trainable experts per block frozen after each step", minimum=0)
        freeze_rule: str = opt("trainable", "which experts freeze_top picks from: the still trainable ones, keeping "
                                            "top_k trainable (trainable), or all of them, a frozen one re-picked "
                                            "(all: the original's)", choices=FREEZE_RULES)
        adapter_rank: int = opt(64, "bottleneck width r of each expert", minimum=1)
        adapter_scale: float = opt(0.1, "scale s of the expert output added to the block's")
        adapter_dropout: float = opt(0.0, "dropout inside the experts", fraction=True)
        label_smoothing: float = label_smoothing_option()
        train_vocab: str = train_vocab_option()

        def check(self) -> None:
            if self.top_k > self.num_experts:
                raise UserError(f"--opt top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        self.adapters = Adapters(clip.model, num_experts=self.opts.num_experts, rank=self.opts.adapter_rank,
                                 scale=self.opts.adapter_scale, dropout=self.opts.adapter_dropout,
                                 cond_dim=self._expert_condition_dim())
        self.frozen_features = FrozenFeatures(clip, self.adapters)
        self.usage = torch.zeros(self.adapters.num_layers, self.num_experts)  # this step's training routing
        self.eval_usage = torch.zeros_like(self.usage)
        self.trainable_now = torch.ones(self.adapters.num_layers, self.num_experts, dtype=torch.bool)  # this step's
        self.last_context: RoutingContext | None = None  # the latest forward's gates (tests, debugging)

    def _closed_experts(self) -> torch.Tensor | None:
        """[E] experts the router cannot pick yet (None: all open); `freeze_most_used` skips them."""
        return None

    def _expert_condition_dim(self) -> int:
        """Width of the per-sample condition the experts read besides the tokens (0: none; see
        `ExpertBank`); `self.opts` and `self.context` are set when it is asked."""
        return 0

    @property
    def num_experts(self) -> int:
        return self.adapters.num_experts

    @property
    def top_k(self) -> int:
        return self.opts.top_k

    @property
    def _device(self) -> torch.device:
        return self.adapters.banks[0].down.device

    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(*shape, device=self._device)

    # -- per step -------------------------------------------------------------------------------
    def _begin_experts(self) -> None:
        self.usage = self._zeros(self.adapters.num_layers, self.num_experts)
        self.eval_usage = torch.zeros_like(self.usage)
        self.adapters.hold_frozen()  # after a resumed run loads its checkpoint, snapshot the frozen experts
        self.trainable_now = ~self.adapters.frozen()

    def _end_experts(self) -> list[list[int]]:
        """Freeze the `freeze_top` most-used experts of each block (`freeze_rule`). Returns the newly
        frozen experts per block."""
        self.eval_usage.zero_()
        return freeze_most_used(self.adapters, self.usage, self.opts.freeze_top, self.top_k,
                                getattr(self.opts, "freeze_rule", "trainable"), self._closed_experts())

    def _route(self, batch: Batch, ctx: RoutingContext) -> torch.Tensor:
        """Normalised image features with the adapters routed by `ctx`; usage recorded."""
        self.last_context = ctx
        with self.adapters.routing(ctx):
            feats = self.clip.model.encode_image(batch.images)
        usage = expert_usage(ctx.gates, self.num_experts).detach()
        if self.training:
            self.usage = self.usage + usage
        else:
            self.eval_usage = self.eval_usage + usage
        return F.normalize(feats.float(), dim=-1)

    def _balance(self, ctx: RoutingContext) -> torch.Tensor:
        if self.opts.lb_weight <= 0 or self.num_experts == 1:
            return torch.zeros((), device=self._device)
        return self.opts.lb_weight * load_balancing_loss(ctx.gates, self.num_experts).to(self._device)

    def trainable_share(self) -> list[float | None]:
        """Per block, the share of this step's training routing that went to experts it could train.
        A step learns through its trainable experts only: where the router sends its images to
        frozen ones (a share near 0), it learns nearly nothing and moves the router for old steps."""
        total = self.usage.sum(1)
        mine = (self.usage * self.trainable_now.to(self.usage.device)).sum(1)
        return [round(float(m / t), 4) if t > 0 else None for m, t in zip(mine, total)]

    def expert_statistics(self) -> dict:
        return {"experts": self.num_experts, "top_k": self.top_k,
                "usage": self.usage.round().int().tolist(), "trainable_share": self.trainable_share(),
                "eval_usage": summed_over_ranks(self.eval_usage).round().int().tolist(),
                "frozen": self.adapters.frozen_experts()}
