"""`moe-adapters`: Yu et al., "Boosting Continual Learning of Vision-Language Models via
Mixture-of-Experts Adapters" (CVPR 2024), reimplemented faithfully on the shared MoE layer.

- Each image-tower block gets E bottleneck experts (r = 64, s = 0.1, Up zero-initialised) and a
  router h = c @ W_g, with noisy top-k gating h + eps * (softplus(c @ W_noise) + 0.01) in
  training only. (W_g, W_noise) are zero-initialised; with `task_routers` there is one pair per
  task, created in `begin_step` (older pairs stop training), otherwise one pair for all tasks.
- Loss: cross-entropy over the current step's classes (label smoothing per preset) plus the
  load-balancing loss cv^2(importance) + cv^2(load) with weight `lb_weight` (0.01), actually added.
- After each task the `freeze_top` most-used still-trainable experts of each block are frozen for
  all later tasks (at least top_k stay trainable).
- Task-agnostic inference (DDAS, see ddas.py): per-task autoencoders on frozen CLIP features pick
  each test sample's router, or send it to the original CLIP (adapters off).

Not copied from the original: gate noise at evaluation, the computed-but-unused balancing loss,
host syncs in the dispatcher.

Presets (`--opt preset=...`, see `presets`); every field can be overridden with its own `--opt`:
  cil  (default): num_experts=2, top_k=2, one shared router, no freezing, no selector; the prompt
        "a bad photo of a {}." (option templates). The paper's engine settings: --epochs 1
        --batch-size 128 --lr 1e-3 --warmup 30 (the engine's defaults except the batch size).
  mtil: num_experts=22, top_k=2, one router per task, freeze_top=2, DDAS selector, label
        smoothing 0.2. Needs engine flags: --iters 1000 --batch-size 64 --warmup 100 (--lr 1e-3).
  mixed: the mtil configuration (what the original runs on a sequence of different tasks) scaled
        to a 6-8 step scenario such as synthetic-uniil: 2 experts per step as mtil has (14), top-2,
        one router per step, freeze_top=2, DDAS, label smoothing 0.2.
The options, with help, are declared in `MoEAdapters.Options` (`uniil methods show moe-adapters`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import RoutingContext, noisy_logits
from .base import Batch, StepData, opt, register_method, templates_option
from .ddas import TaskSelector
from .moe_common import MoEMethod, summed_over_ranks

log = logging.getLogger(__name__)


def _reference_problem(value: str | None) -> str | None:
    """Checked when the run starts, not after the first step, when the reference is first read."""
    if value is None:
        return None
    from pathlib import Path

    from ...data.registry import known_datasets
    from ...data.rendered import RENDERED

    name = value.partition(":")[0]
    if name in RENDERED or name in known_datasets() or Path(value).is_dir():
        return None
    return "name a dataset (DATASET or DATASET:DOMAIN) or an ImageFolder root"


@register_method("moe-adapters")
class MoEAdapters(MoEMethod):
    """Yu et al., CVPR 2024: E experts per block, noisy top-k routers, expert freezing, DDAS selector."""

    @dataclass(frozen=True)
    class Options(MoEMethod.Options):
        preset: str = opt("cil", "a bundle of option values (see presets), applied before the explicit --opt ones")
        freeze_top: int = opt(0, "most-used trainable experts per block frozen after each task", minimum=0)
        templates: str = templates_option("a bad photo of a {}.")
        task_routers: bool = opt(False, "one router per task (older routers stop training)")
        selector: bool = opt(False, "DDAS: per-task autoencoders pick each test image's router, or original CLIP")
        ddas_hidden: int = opt(128, "DDAS: hidden width of each autoencoder", minimum=1)
        ddas_epochs: int = opt(30, "DDAS: training epochs of each autoencoder", minimum=1)
        ddas_lr: float = opt(1e-3, "DDAS: Adam learning rate of the autoencoders", positive=True)
        ddas_quantile: float = opt(0.99, "DDAS: threshold = this quantile of a task's training errors", fraction=True)
        ddas_threshold: float | None = opt(None, "DDAS: an absolute threshold instead of the quantile")
        ddas_reference: str | None = opt(None, "DDAS: generic images for a reference autoencoder: DATASET, "
                                         "DATASET:DOMAIN or an ImageFolder root", check=_reference_problem)
        ddas_reference_limit: int = opt(2000, "DDAS: images read from ddas_reference", minimum=1)

    presets = {
        "cil": {"num_experts": 2, "top_k": 2, "task_routers": False, "freeze_top": 0, "selector": False,
                "label_smoothing": 0.0},
        "mtil": {"num_experts": 22, "top_k": 2, "task_routers": True, "freeze_top": 2, "selector": True,
                 "label_smoothing": 0.2},
        "mixed": {"num_experts": 14, "top_k": 2, "task_routers": True, "freeze_top": 2, "selector": True,
                  "label_smoothing": 0.2},
    }

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        o = self.opts
        self.w_gate = nn.ParameterList()
        self.w_noise = nn.ParameterList()
        self.selector = None
        if o.selector:
            self.selector = TaskSelector(clip.dim, o.ddas_hidden, o.ddas_epochs, o.ddas_lr, o.ddas_quantile,
                                         o.ddas_threshold, reference=o.ddas_reference is not None)
        self._current = 0
        self._choices: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- structure ------------------------------------------------------------------------------
    def begin_step(self, t: int, data: StepData) -> None:
        shape = (self.adapters.num_layers, self.adapters.width, self.num_experts)
        while len(self.w_gate) < (t + 1 if self.opts.task_routers else 1):
            self.w_gate.append(nn.Parameter(self._zeros(*shape)))
            self.w_noise.append(nn.Parameter(self._zeros(*shape)))
        self._current = len(self.w_gate) - 1
        for i, (g, n) in enumerate(zip(self.w_gate, self.w_noise)):
            g.requires_grad_(i == self._current)
            n.requires_grad_(i == self._current)
        if self.selector is not None:
            while len(self.selector.tasks) < t + 1:
                self.selector.add_task(self._device)
        self._begin_experts()
        self._choices = []

    def end_step(self, t: int, data: StepData) -> None:
        self._end_experts()
        self._choices = []
        if self.selector is not None:
            threshold = self.selector.fit_task(t, self.frozen_features.of_source(data.train_source), seed=t)
            log.info("step %d: DDAS autoencoder fitted, threshold %.4g", t + 1, threshold)
            if self.selector.reference is not None and not bool(self.selector.reference.fitted):
                self.selector.fit_reference(self._reference_features(), seed=1_000_003)

    def _reference_features(self) -> torch.Tensor:
        from ...data.images import dataset_images

        name, _, domain = self.opts.ddas_reference.partition(":")
        data = self.context.data  # the run's --data-root / --download
        return self.frozen_features.of_source(dataset_images(
            name, "train", domain or None, data_root=data.data_root if data else None,
            limit=self.opts.ddas_reference_limit, download=bool(data and data.download)))

    # -- routing --------------------------------------------------------------------------------
    def _router(self, task: int | torch.Tensor):
        """Gate logits of router `task` (an int), or of each sample's own router (a [B] tensor)."""
        def route(layer: int, cls: torch.Tensor) -> torch.Tensor:
            if isinstance(task, int):
                clean = cls @ self.w_gate[task][layer]
                noise = cls @ self.w_noise[task][layer]
            else:
                gates = torch.stack([w[layer] for w in self.w_gate])  # [T, d, E]
                clean = torch.einsum("bd,tde->bte", cls, gates.to(cls.dtype))
                clean = clean.gather(1, task.view(-1, 1, 1).expand(-1, 1, clean.shape[-1])).squeeze(1)
                noise = clean  # evaluation only: no noise
            return noisy_logits(clean.float(), noise.float(), self.training)
        return route

    def forward(self, batch: Batch, data: StepData) -> torch.Tensor:
        ctx = RoutingContext(self._router(self._current), self.top_k)
        feats = self._route(batch, ctx)
        return self.classification_loss(feats, batch, data, self.opts.label_smoothing) + self._balance(ctx)

    def encode(self, batch: Batch) -> torch.Tensor:
        if self.training or self.selector is None or not len(self.selector.tasks):
            return self._route(batch, RoutingContext(self._router(self._current), self.top_k))
        task, on = self.selector.choose(self.frozen_features(batch))
        self._choices.append((task, on))
        router = self._router(task if self.opts.task_routers else self._current)
        return self._route(batch, RoutingContext(router, self.top_k, sample_mask=on.float()))

    # -- records --------------------------------------------------------------------------------
    def statistics(self) -> dict:
        stats = {**self.expert_statistics(), "routers": len(self.w_gate)}
        if self.selector is not None and len(self.selector.tasks):  # every DDP rank joins the sum
            task = torch.cat([c[0] for c in self._choices]) if self._choices else torch.zeros(0, dtype=torch.long)
            on = torch.cat([c[1] for c in self._choices]) if self._choices else torch.zeros(0, dtype=torch.bool)
            counts = torch.bincount(task[on].cpu(), minlength=len(self.selector.tasks)).to(self._device)
            counts = summed_over_ranks(torch.cat([counts, (~on).sum().view(1).to(self._device)])).tolist()
            if self._choices or sum(counts):
                stats["ddas"] = {"task_counts": counts[:-1], "original_clip": counts[-1],
                                 "thresholds": [round(float(ae.threshold), 6) for ae in self.selector.tasks]}
        return stats
