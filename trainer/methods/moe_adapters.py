"""`moe-adapters`: Yu et al., "Boosting Continual Learning of Vision-Language Models via
Mixture-of-Experts Adapters" (CVPR 2024), reimplemented on the shared MoE layer.

- Every block of both towers gets E bottleneck experts (r = 64, s = 0.1, dropout 0.1 in the
  presets, Up zero-initialised) and a router h = c @ W_g on its first token (the image's CLS, the
  text's start token), with noisy top-k gating h + eps * (softplus(c @ W_noise) + 0.01) in
  training only. (W_g, W_noise) are zero-initialised; with `task_routers` there is one pair per
  task and tower, created in `begin_step` (older pairs stop training), else one pair for all.
- Text experts (text_experts.py; `towers`): class prototypes are the prompts encoded through the
  adapted text tower, every training batch and once per router per evaluation. Backbones whose
  text tower is not an open_clip transformer (uniil-micro's MiniLM) keep fixed prototypes.
- Loss: cross-entropy over the current step's classes (`train_vocab`; label smoothing per preset)
  plus the load-balancing loss cv^2(importance) + cv^2(load) with weight `lb_weight` (0.01).
- After each task the `freeze_top` most-used experts of each block, in each tower, are frozen for
  all later tasks: among all experts, a frozen one re-picked (`freeze_rule=all`, the original's),
  or among the still trainable ones, keeping top_k trainable (`trainable`).
- Task-agnostic inference (DDAS, see ddas.py): per-task autoencoders on frozen CLIP features pick
  each test batch's (`ddas_decision=batch`, the original's) or sample's router, whose text
  prototypes then score it, or send it to the original CLIP (adapters off in both towers).
- MTIL: each dataset's own CLIP templates (`dataset_templates`) and learning rate (`dataset_lrs`).

Not copied from the original: gate noise at evaluation (its CIL code keeps the training flag it
was built with), a balancing loss computed but never added (CIL), host syncs in the dispatcher,
DDAS on AlexNet features with one absolute threshold (ours: frozen CLIP features, a quantile of
each task's training errors unless `ddas_threshold` is given).

Presets (`--opt preset=...`, see `presets`); every field can be overridden with its own `--opt`:
  cil  (default): num_experts=2, top_k=2, one shared router, no freezing, no selector; the prompt
        "a bad photo of a {}." (option templates). The paper's engine settings: --epochs 1
        --batch-size 128 --lr 1e-3 --warmup 30.
  mtil: num_experts=22, top_k=2, one router per task, freeze_top=2 (rule all), DDAS per batch,
        label smoothing 0.2, per-dataset templates and learning rates. Engine flags: --iters 1000
        --batch-size 64 --warmup 100.
  mixed: the mtil configuration (what the original runs on a sequence of different tasks) scaled
        to a 6-8 step scenario such as synthetic-uniil: 2 experts per step as mtil has (14), top-2,
        one router per step, freeze_top=2 (rule all), DDAS per batch, label smoothing 0.2.
The options, with help, are declared in `MoEAdapters.Options` (`uniil methods show moe-adapters`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UserError
from ..adapters import RoutingContext, tower_transformer
from .base import Batch, StepData, opt, register_method, templates_option
from .ddas import TaskSelector
from .moe_common import MoEMethod, grow_task_routers, summed_over_ranks, task_router
from .text_experts import TextExperts

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


def _parse_lrs(value: str) -> dict[str, float]:
    pairs = [item.partition("=") for item in value.split(",") if item.strip()]
    return {name.strip(): float(lr) for name, _, lr in pairs}


def _lrs_problem(value: str) -> str | None:
    try:
        lrs = _parse_lrs(value)
    except ValueError:
        return "write DATASET=LR pairs separated by commas, e.g. aircraft=5e-3,mnist=1e-4"
    if any(lr <= 0 for lr in lrs.values()):
        return "every learning rate must be positive"
    from ...data.registry import known_datasets
    from ...data.rendered import RENDERED

    unknown = sorted(set(lrs) - set(known_datasets()) - set(RENDERED))
    if unknown:  # a misspelt name would silently train at --lr
        return f"unknown dataset(s) {', '.join(unknown)}; the names are those of data/datasets.yaml and the rendered ones"
    return None


# The original's MTIL script: lr per dataset (its train_full_shot_router11_experts22_1000iters.sh).
MTIL_LRS = ("aircraft=5e-3,caltech101=1e-3,cifar100=5e-3,dtd=1e-3,eurosat=1e-4,flowers102=1e-3,food101=1e-3,"
            "mnist=1e-4,oxford_pet=1e-3,stanford_cars=1e-3,sun397=1e-3")


@register_method("moe-adapters")
class MoEAdapters(MoEMethod):
    """Yu et al., CVPR 2024: E experts per block of both towers, noisy top-k routers, expert freezing, DDAS."""

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
        ddas_decision: str = opt("sample", "DDAS: decide per test image (sample), or once per test batch from "
                                           "the batch's mean errors (batch: the original's MTIL evaluation)",
                                 choices=("sample", "batch"))
        towers: str = opt("auto", "towers with experts: both (the original's), image, or auto (both where the "
                                  "text tower is an open_clip transformer, else image)", choices=("auto", "both", "image"))
        dataset_templates: bool = opt(False, "each class's prompts are its dataset's own CLIP templates "
                                             "(data/prompt_templates.py; others keep `templates`): the original's MTIL")
        dataset_lrs: str = opt("", "per-dataset peak learning rates DATASET=LR,...; other datasets use --lr",
                               check=_lrs_problem)

    presets = {
        "cil": {"num_experts": 2, "top_k": 2, "task_routers": False, "freeze_top": 0, "selector": False,
                "label_smoothing": 0.0, "adapter_dropout": 0.1},
        "mtil": {"num_experts": 22, "top_k": 2, "task_routers": True, "freeze_top": 2, "freeze_rule": "all",
                 "selector": True, "ddas_decision": "batch", "label_smoothing": 0.2, "adapter_dropout": 0.1,
                 "dataset_templates": True, "dataset_lrs": MTIL_LRS},
        "mixed": {"num_experts": 14, "top_k": 2, "task_routers": True, "freeze_top": 2, "freeze_rule": "all",
                  "selector": True, "ddas_decision": "batch", "label_smoothing": 0.2, "adapter_dropout": 0.1},
    }

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        o = self.opts
        self.w_gate = nn.ParameterList()
        self.w_noise = nn.ParameterList()
        self.selector = None
        if o.selector:
            self.selector = TaskSelector(clip.dim, o.ddas_hidden, o.ddas_epochs, o.ddas_lr, o.ddas_quantile,
                                         o.ddas_threshold, reference=o.ddas_reference is not None,
                                         decision=o.ddas_decision)
        self.text_experts = None
        prompts = self._class_prompts()
        if o.dataset_templates and prompts is not None:  # t_c from each class's own templates
            from ...attrpool.zeroshot import prompt_embeddings

            self.text = torch.from_numpy(prompt_embeddings(clip, prompts)).to(self.text.device)
        if self._text_tower_on(prompts):
            self.text_experts = TextExperts(clip, prompts, o)
        self._lrs = _parse_lrs(o.dataset_lrs)
        self._lr: float | None = None  # the step's learning rate, for the record
        self._current = 0
        self._choices: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _class_prompts(self) -> list[list[str]] | None:
        """Each class's templates filled in with its name; None when the run's classes are not known."""
        from ...data.prompt_templates import class_prompts

        names = self.context.class_names
        if not names:
            return None
        own = self.opts.templates.split("|")
        datasets = self.context.class_datasets or ("",) * len(names)
        lists = class_prompts(list(datasets), own) if self.opts.dataset_templates else [own] * len(names)
        return [[t.format(name) for t in templates] for name, templates in zip(names, lists)]

    def _text_tower_on(self, prompts) -> bool:
        towers = self.opts.towers
        if towers == "image":
            return False
        open_clip_text = tower_transformer(self.clip.model, "text") is not None
        if towers == "both" and not open_clip_text:
            raise UserError(f"--opt towers=both: the text tower of {self.clip.spec.model} is not an open_clip "
                            "transformer (uniil-micro's is MiniLM); use --opt towers=image")
        if towers == "both" and prompts is None:
            raise UserError("--opt towers=both needs the run's class names (the engine gives them)")
        return open_clip_text and prompts is not None

    def learning_rate(self, data: StepData, lr: float) -> float:
        self._lr = self._lrs.get(data.step.dataset, lr)
        return self._lr

    # -- structure ------------------------------------------------------------------------------
    def begin_step(self, t: int, data: StepData) -> None:
        shape = (self.adapters.num_layers, self.adapters.width, self.num_experts)
        self._current = grow_task_routers(self.w_gate, self.w_noise, t + 1 if self.opts.task_routers else 1, shape,
                                          self._device)
        if self.selector is not None:
            while len(self.selector.tasks) < t + 1:
                self.selector.add_task(self._device)
        if self.text_experts is not None:
            self.text_experts.begin_step(len(self.w_gate))
        self._begin_experts()
        self._choices = []

    def end_step(self, t: int, data: StepData) -> None:
        self._end_experts()
        if self.text_experts is not None:
            self.text_experts.end_step(self.top_k)
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
        return task_router(self, task)

    def forward(self, batch: Batch, data: StepData) -> torch.Tensor:
        ctx = RoutingContext(self._router(self._current), self.top_k)
        feats = self._route(batch, ctx)
        return self.classification_loss(feats, batch, data, self.opts.label_smoothing) + self._balance(ctx)

    def encode(self, batch: Batch) -> torch.Tensor:
        """Image features; with text experts, at evaluation, one more column: the router whose text
        prototypes score the image (-1: the original CLIP's), which `logits` reads."""
        if self.training or self.selector is None or not len(self.selector.tasks):
            feats = self._route(batch, RoutingContext(self._router(self._current), self.top_k))
            routers = torch.full((len(feats),), self._current, device=feats.device)
        else:
            task, on = self.selector.choose(self.frozen_features(batch))
            self._choices.append((task, on))
            chosen = task if self.opts.task_routers else self._current
            feats = self._route(batch, RoutingContext(self._router(chosen), self.top_k, sample_mask=on.float()))
            routers = torch.where(on, chosen, -1)
        if self.text_experts is None or self.training:
            return feats
        return torch.cat([feats, routers.to(feats.dtype)[:, None]], dim=1)

    def logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """100 f . t_c, the prototypes t_c through the text experts of the image's router."""
        experts = self.text_experts
        if experts is None:
            return super().logits(features, classes)
        if self.training:
            return 100.0 * features @ experts.prototypes(self._current, classes, self.top_k).to(features.dtype).T
        feats, routers = features[:, :-1], features[:, -1].round().long()
        out = 100.0 * feats @ self.text[classes].to(feats.dtype).T  # router -1: the original CLIP
        for r in routers.unique().tolist():  # evaluation only: at most one pass per router
            if r >= 0:
                mine = 100.0 * feats @ experts.prototypes(r, classes, self.top_k).to(feats.dtype).T
                out = torch.where((routers == r)[:, None], mine, out)
        return out

    # -- records --------------------------------------------------------------------------------
    def statistics(self) -> dict:
        stats = {**self.expert_statistics(), "routers": len(self.w_gate)}
        if self._lr is not None:
            stats["lr"] = self._lr
        if self.text_experts is not None:
            stats["text"] = {"usage": self.text_experts.usage.round().int().tolist(),
                             "frozen": self.text_experts.adapters.frozen_experts()}
        if self.selector is not None and len(self.selector.tasks):  # every DDP rank joins the sum
            task = torch.cat([c[0] for c in self._choices]) if self._choices else torch.zeros(0, dtype=torch.long)
            on = torch.cat([c[1] for c in self._choices]) if self._choices else torch.zeros(0, dtype=torch.bool)
            counts = torch.bincount(task[on].cpu(), minlength=len(self.selector.tasks)).to(self._device)
            counts = summed_over_ranks(torch.cat([counts, (~on).sum().view(1).to(self._device)])).tolist()
            if self._choices or sum(counts):
                stats["ddas"] = {"task_counts": counts[:-1], "original_clip": counts[-1],
                                 "thresholds": [round(float(ae.threshold), 6) for ae in self.selector.tasks]}
        return stats
