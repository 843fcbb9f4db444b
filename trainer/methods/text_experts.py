"""Experts in the text tower, as the original MoE-Adapters builds them (Yu et al., CVPR 2024).

Every text block gets E experts and, per task, a router (W_g, W_noise), zero-initialised like the
image side's. Class prototypes are no longer fixed: they are the class prompts encoded through the
adapted text tower, with grad once per training batch (the original re-encodes the prompts in
every forward), and once per router per evaluation otherwise, cached until the method trains
again. The router of a prototype set is a task's (the one DDAS picks for an image, or the current
one), or None: the adapters off, i.e. the original CLIP's text embeddings.

Prompts: each class has a list of templates (the `templates` option, or its dataset's own with
`dataset_templates`, data/prompt_templates.py). Training encodes the first, evaluation averages
them all, as the original's MTIL code does (`dataset.template` vs `dataset.templates`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapters, RoutingContext, expert_usage
from .moe_common import freeze_most_used, grow_task_routers, task_router


EVAL_CHUNK = 1024  # prompts per text forward at evaluation: bounds its activations on large vocabularies


class TextExperts(nn.Module):
    def __init__(self, clip, prompts: list[list[str]], opts):
        super().__init__()
        self.clip, self.opts = clip, opts
        self.adapters = Adapters(clip.model, num_experts=opts.num_experts, rank=opts.adapter_rank,
                                 scale=opts.adapter_scale, dropout=opts.adapter_dropout, tower="text")
        self.w_gate = nn.ParameterList()
        self.w_noise = nn.ParameterList()
        # Every prompt once [P, L] (classes have different numbers of templates), the class of each,
        # and each class's first prompt, the one training encodes.
        flat = [text for own in prompts for text in own]
        self.register_buffer("tokens", clip.tokenizer(flat).to(clip.device), persistent=False)
        owner = torch.tensor([c for c, own in enumerate(prompts) for _ in own])
        self.register_buffer("owner", owner.to(clip.device), persistent=False)
        starts = torch.tensor([0] + [len(own) for own in prompts[:-1]]).cumsum(0)
        self.register_buffer("first", starts.to(clip.device), persistent=False)
        self.num_classes = len(prompts)
        self.usage = torch.zeros(self.adapters.num_layers, opts.num_experts, device=clip.device)
        self._cache: dict[int | None, torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return self.adapters.num_layers

    # -- per step -------------------------------------------------------------------------------
    def begin_step(self, routers: int) -> None:
        """Make `routers` router pairs (zero-initialised), of which only the newest trains, as on the image side."""
        shape = (self.adapters.num_layers, self.adapters.width, self.opts.num_experts)
        grow_task_routers(self.w_gate, self.w_noise, routers, shape, self.tokens.device)
        self.usage = torch.zeros_like(self.usage)
        self.adapters.hold_frozen()
        self._cache.clear()

    def end_step(self, top_k: int) -> list[list[int]]:
        """Freeze the text experts as the image side freezes its own, by their training usage."""
        self._cache.clear()
        return freeze_most_used(self.adapters, self.usage, self.opts.freeze_top, top_k, self.opts.freeze_rule)

    def train(self, mode: bool = True):
        self._cache.clear()  # prototypes change as soon as the experts train
        return super().train(mode)

    # -- prototypes -----------------------------------------------------------------------------
    def prototypes(self, router: int | None, classes: torch.Tensor, top_k: int) -> torch.Tensor:
        """[len(classes), D] L2-normalised class prototypes through the text tower routed by
        `router` (None: adapters off). In training: the first template, with grad, every call.
        Otherwise: the mean over every template; each class is encoded once per router and kept
        until the experts train again."""
        if self.training:
            return self._encode(self.tokens[self.first[classes]], router, top_k)
        if router not in self._cache:
            self._cache[router] = (torch.zeros(self.num_classes, self.clip.dim, device=self.tokens.device),
                                   torch.zeros(self.num_classes, dtype=torch.bool, device=self.tokens.device))
        protos, done = self._cache[router]
        missing = classes[~done[classes]].unique()
        if len(missing):  # evaluation only: the host sync of this check costs nothing there
            with torch.no_grad():
                rows = torch.isin(self.owner, missing).nonzero().squeeze(1)
                feats = torch.cat([self._encode(self.tokens[chunk], router, top_k)
                                   for chunk in rows.split(EVAL_CHUNK)])
                sums = torch.zeros(self.num_classes, feats.shape[1], device=feats.device)
                sums.index_add_(0, self.owner[rows], feats)
                protos[missing] = F.normalize(sums[missing], dim=-1)  # the mean's direction
                done[missing] = True
        return protos[classes]

    def _encode(self, tokens: torch.Tensor, router: int | None, top_k: int) -> torch.Tensor:
        ctx = None if router is None else RoutingContext(task_router(self, router), top_k)
        with self.adapters.routing(ctx):
            feats = self.clip.model.encode_text(tokens)
        if ctx is not None and self.training:
            self.usage = self.usage + expert_usage(ctx.gates, self.opts.num_experts).detach()
        return F.normalize(feats.float(), dim=-1)
