"""`mage`: Mixture of Attribute-Guided Experts (Uni-IL), this project's reading (docs/methods.md#mage).

- Active pool and matching on frozen features (mage_attributes.py): z = [a_cls ; a_dom].
- One router per block, shared by all steps, no task id anywhere:
      h = c @ W_l + z @ U_l  (+ eps * (softplus(c @ W_noise) + 0.01) in training), top-k of E.
  W_l, W_noise zero-initialised; (choice) U_l ~ N(0, router_init^2), so that images with different
  attributes start on different experts (`--opt router_init=0` starts U at zero).
- Forgetting control: after each step the `freeze_top` most-used still-trainable experts of each
  block are frozen (at least top_k stay trainable); attribute anchoring adds
  lambda * mean_l mean_k ||(U_l - U_l_old)^T z_k||^2 over data-free attribute features z_k of the
  old (class, domain) pairs (their pool attribute means), U_l_old = U_l after the previous step.
- Zero-shot preservation: a test image whose best similarity to an active class attribute is below
  theta uses the original CLIP (adapters off); theta = the `selector_quantile` (5%) quantile of that
  similarity over the training images seen so far.
- Classifier: 100 * f_adapted . t'_c, t'_c = normalise(t_c + beta * mean attribute embedding of c),
  set when the step that introduces c begins (its name is known from then on; a class evaluated
  before it is introduced, for Transfer, uses t_c). Classes without attributes keep t_c (warning).
- Loss: cross-entropy over the step's classes + load balancing (lb_weight) + anchoring (anchor).

Variants (issue 14, each an option measured in benchmarks/RESULTS.md):
- router_input=frozen: c is the frozen CLIP feature f(x) (the one matching reads, D wide) instead of
  the block's adapted CLS token, so an old image is routed by what it looked like to the original
  model forever, not by a token that the experts trained since have moved.
- anchor_w: with router_input=frozen, W is anchored as U is, on data-free rows in the same space:
  the prototypes t'_c of the old classes (CLIP's joint space holds images and text alike).
- expert_attributes: the experts read z too, not only the router: h = ReLU(x Down_e + b_e + z Cond_e)
  (Cond_e zero-initialised, frozen with its expert), so one expert can act differently on images
  with different attributes.
- novelty_reserve = R: R experts per block start closed (the router cannot pick them). Before a
  step trains, its novelty is measured: the share of its training images whose best similarity to
  the attributes active so far is below the selector threshold theta (images the known attributes
  do not explain). A step at least `novelty_threshold` novel opens top_k closed experts and freezes
  every other expert, so what it learns goes into fresh capacity and cannot overwrite old experts.
- trainable_floor = f: in training, a hinge loss mean_l mean_x relu(f - p_l(x)), p_l(x) the softmax
  gate mass of image x in block l on the experts this step can train, so that a step's images
  reach experts that can learn them (a step whose routing stays on frozen experts learns little:
  `trainable_share` in the statistics, benchmarks/RESULTS.md). 0.5 is the default: the one variant
  that beat the plain router beyond two stds on validation; 0 turns it off.

Options (`--opt k=v`, declared in `Mage.Options`; `uniil methods show mage`): the ablations
no_attributes (z = 0: a shared-router MoE), attr_kind (class|domain|both), attr_topk, no_selector,
beta (0: plain prototypes), and the model's num_experts, top_k, tau, router_init, anchor, ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ..adapters import RoutingContext, noisy_logits
from .base import Batch, StepData, opt, register_method
from .mage_attributes import KINDS, AttributeMatcher, ConfidenceHistogram
from .moe_common import MoEMethod, summed_over_ranks

log = logging.getLogger(__name__)

ROUTER_INPUTS = ("adapted", "frozen")
CLOSED_LOGIT = -1e9  # a closed expert's gate logit: never among the top k (finite: no inf - inf anywhere)


@register_method("mage")
class Mage(MoEMethod):
    """Uni-IL's Mixture of Attribute-Guided Experts: routers read the image's matched attributes (needs --pool)."""

    @dataclass(frozen=True)
    class Options(MoEMethod.Options):
        num_experts: int = opt(16, "experts E per image-tower block", minimum=1)
        no_attributes: bool = opt(False, "ablation: z = 0, a shared-router MoE")
        attr_kind: str = opt("both", "attributes that route", choices=KINDS)
        attr_topk: int = opt(5, "attributes matched per image and kind", minimum=1)
        no_selector: bool = opt(False, "ablation: no attribute-confidence selector (never the original CLIP)")
        beta: float = opt(1.0, "weight of the attribute mean in the class prototypes (0: plain class text)")
        tau: float = opt(0.05, "softmax temperature of attribute matching", positive=True)
        router_init: float = opt(1.0, "std of the attribute router weights U at init (0: zeros)", minimum=0)
        anchor: float = opt(1.0, "weight lambda of attribute anchoring of the router", minimum=0)
        selector_quantile: float = opt(0.05, "selector threshold theta: this quantile of training images' "
                                       "attribute confidence", fraction=True)
        router_input: str = opt("adapted", "what W reads: each block's adapted CLS token (adapted) or the "
                                           "frozen CLIP feature of the image (frozen)", choices=ROUTER_INPUTS)
        anchor_w: bool = opt(False, "anchor W too, on the old classes' prototypes (needs router_input=frozen)")
        expert_attributes: bool = opt(False, "the experts read the attribute feature z too, not only the router")
        novelty_reserve: int = opt(0, "experts per block held closed until a novel step opens top_k of them and "
                                      "freezes the rest (0: off)", minimum=0)
        novelty_threshold: float = opt(0.1, "share of a step's training images below the selector threshold that "
                                            "makes the step novel", fraction=True)
        trainable_floor: float = opt(0.5, "in training, push each image's gate mass on the experts this step can "
                                          "train up to at least this (a hinge loss; 0: off; 0.5 won on validation, "
                                          "benchmarks/RESULTS.md)", fraction=True)

        def check(self) -> None:
            super().check()
            if self.anchor_w and self.router_input != "frozen":
                raise UserError("--opt anchor_w=true needs --opt router_input=frozen: W is anchored on prototypes, "
                                "which live in the frozen feature space, not in the blocks' token space")
            if self.novelty_reserve > self.num_experts - self.top_k:
                raise UserError(f"--opt novelty_reserve={self.novelty_reserve} leaves fewer than top_k={self.top_k} "
                                f"of num_experts={self.num_experts} experts open: use at most "
                                f"{self.num_experts - self.top_k}")

    needs_pool = True

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        o = self.opts
        self.text = text.clone()  # prototypes are enriched in place
        self.matcher = AttributeMatcher(self.context.pool, o.attr_kind, o.attr_topk, o.tau)
        L, E, zdim = self.adapters.num_layers, self.num_experts, 2 * self.matcher.dim
        d = self.matcher.dim if o.router_input == "frozen" else self.adapters.width
        self.w = nn.Parameter(torch.zeros(L, d, E))
        self.w_noise = nn.Parameter(torch.zeros(L, d, E))
        self.u = nn.Parameter(torch.randn(L, zdim, E) * o.router_init)
        self.register_buffer("u_old", torch.zeros(L, zdim, E))
        self.register_buffer("w_old", torch.zeros(L, d, E))
        self.register_buffer("confidence", ConfidenceHistogram.empty())
        self.register_buffer("theta", torch.tensor(float("-inf")))
        # [E]: experts not yet opened; only with a reserve, so other runs' checkpoints keep their keys
        if o.novelty_reserve:
            self.register_buffer("closed", torch.arange(E) >= E - o.novelty_reserve)
        else:
            self.closed = None
        self._novelty: dict = {}
        self._plain_text = None
        self._steps: dict[int, tuple[set[str], list[tuple[str, str]], list[tuple[int, str]]]] = {}
        self._anchors = torch.zeros(0, zdim)
        self._w_anchors = torch.zeros(0, self.matcher.dim)
        self._eval_on: list[torch.Tensor] = []
        self._stats: dict = {}

    def _closed_experts(self) -> torch.Tensor | None:
        return self.closed

    def _expert_condition_dim(self) -> int:
        return 2 * np.asarray(self.context.pool.embeddings).shape[1] if self.opts.expert_attributes else 0

    # -- structure (cheap, deterministic: replayed on resume) -------------------------------------
    def begin_step(self, t: int, data: StepData) -> None:
        step = data.step
        names = set(step.classes) | {step.domain, step.dataset}
        self._steps[t] = (names, [(c, step.domain) for c in step.classes],
                          list(zip(data.classes.tolist(), step.classes)))
        if t == 0 or self.matcher.emb.device != self._device:
            self.matcher.to(self._device)
        self._novelty = {}
        if data.train_source is not None:  # a replayed step's decision comes back with its checkpoint
            self._open_experts_if_novel(t, data)
        self.matcher.activate(set().union(*(self._steps[s][0] for s in self._steps if s <= t)))
        if t == 0:
            self.matcher.set_center()
        old_pairs = list(dict.fromkeys(p for s in self._steps if s < t for p in self._steps[s][1]))
        self._anchors = self.matcher.anchor_rows(old_pairs)
        self._enrich_prototypes(t)
        old_classes = sorted({g for s in self._steps if s < t for g, _ in self._steps[s][2]})
        self._w_anchors = self.text[old_classes].float().to(self._device)
        self._begin_experts()
        self._eval_on = []

    def _open_experts_if_novel(self, t: int, data: StepData) -> None:
        """novelty_reserve: measured against the attributes active before this step's names join."""
        closed = self.closed.nonzero().flatten().tolist() if self.closed is not None else []
        if not closed or t == 0 or not torch.isfinite(self.theta):
            return
        feats = self.frozen_features.of_source(data.train_source).to(self._device)
        with torch.no_grad():
            smax = torch.cat([self.matcher.match(chunk)[1] for chunk in feats.split(4096)])
        novelty = float((smax < self.theta).float().mean())
        opened = closed[:self.top_k] if novelty >= self.opts.novelty_threshold else []
        if opened:
            self.closed[opened] = False
            keep = torch.zeros(self.num_experts, dtype=torch.bool, device=self.closed.device)
            keep[opened] = True
            self.adapters.freeze((~keep & ~self.closed).expand(self.adapters.num_layers, -1))
        self._novelty = {"novelty": round(novelty, 4), "opened": opened}
        log.info("step %d: novelty %.3f (threshold %.2f)%s", t + 1, novelty, self.opts.novelty_threshold,
                 f", opened experts {opened}" if opened else "")

    def _enrich_prototypes(self, t: int) -> None:
        if self._plain_text is None:
            self._plain_text = self.text.clone()
        for g, name in self._steps[t][2]:
            mean = self.matcher.mean_of(name, "class")
            if mean is None:
                log.warning("class '%s' has no attributes in the pool: its prototype is the plain class text", name)
                continue
            self.text[g] = F.normalize(self._plain_text[g] + self.opts.beta * mean.to(self.text), dim=-1)

    def end_step(self, t: int, data: StepData) -> None:
        self._end_experts()
        self.u_old.copy_(self.u.detach())
        self.w_old.copy_(self.w.detach())
        feats = self.frozen_features.of_source(data.train_source).to(self._device)
        smax, top = [], ([], [])
        with torch.no_grad():
            for chunk in feats.split(4096):
                _, s, ids = self.matcher.match(chunk)
                smax.append(s)
                for j, i in enumerate(ids):
                    if i is not None:
                        top[j].append(i)
        if self.matcher.counts[0]:
            ConfidenceHistogram.add(self.confidence, torch.cat(smax))
        self.theta.fill_(ConfidenceHistogram.quantile(self.confidence, self.opts.selector_quantile))
        self._eval_on = []
        self._stats = {"active_attributes": {"class": self.matcher.counts[0], "domain": self.matcher.counts[1]},
                       **self._novelty, "anchors": len(self._anchors), "theta": round(float(self.theta), 4) if torch.isfinite(self.theta) else None,
                       "top_matched": {k: self.matcher.top_texts(torch.cat(ids)) if ids else []
                                       for k, ids in zip(("class", "domain"), top)}}

    # -- routing --------------------------------------------------------------------------------
    def _attributes(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frozen = self.frozen_features(batch)
        z, smax, _ = self.matcher.match(frozen)
        if self.opts.no_attributes:
            z = torch.zeros_like(z)
        return z, smax, frozen

    def _router(self, z: torch.Tensor, frozen: torch.Tensor):
        def route(layer: int, cls: torch.Tensor) -> torch.Tensor:
            c = frozen.to(cls.dtype) if self.opts.router_input == "frozen" else cls
            clean = c @ self.w[layer] + z.to(cls.dtype) @ self.u[layer]
            logits = noisy_logits(clean.float(), (c @ self.w_noise[layer]).float(), self.training)
            return logits if self.closed is None else logits.masked_fill(self.closed, CLOSED_LOGIT)
        return route

    def _context(self, z: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor | None = None) -> RoutingContext:
        return RoutingContext(self._router(z, frozen), self.top_k, sample_mask=mask,
                              condition=z if self.opts.expert_attributes else None)

    def _anchoring(self) -> torch.Tensor:
        loss = torch.zeros((), device=self._device)
        if self.opts.anchor <= 0:
            return loss
        if not self.opts.no_attributes and len(self._anchors):
            moved = torch.einsum("kz,lze->lke", self._anchors, self.u - self.u_old)
            loss = loss + moved.pow(2).sum(-1).mean()
        if self.opts.anchor_w and len(self._w_anchors):
            moved = torch.einsum("kd,lde->lke", self._w_anchors, self.w - self.w_old)
            loss = loss + moved.pow(2).sum(-1).mean()
        return self.opts.anchor * loss

    def _capacity(self, ctx: RoutingContext) -> torch.Tensor:
        """trainable_floor: relu(floor - gate mass on this step's trainable experts), per image and
        block (ctx.gates holds one entry per block, in block order)."""
        floor = self.opts.trainable_floor
        if floor <= 0:
            return torch.zeros((), device=self._device)
        mine = self.trainable_now.to(self._device, torch.float32)
        short = [F.relu(floor - (logits.softmax(-1) * mine[i]).sum(-1)).mean()
                 for i, (_, _, logits) in enumerate(ctx.gates) if logits is not None]
        return torch.stack(short).mean() if short else torch.zeros((), device=self._device)

    def forward(self, batch: Batch, data: StepData) -> torch.Tensor:
        z, _, frozen = self._attributes(batch)
        ctx = self._context(z, frozen)
        feats = self._route(batch, ctx)
        return (self.classification_loss(feats, batch, data, self.opts.label_smoothing) + self._balance(ctx)
                + self._anchoring() + self._capacity(ctx))

    def encode(self, batch: Batch) -> torch.Tensor:
        z, smax, frozen = self._attributes(batch)
        mask = None
        if not self.training and not self.opts.no_selector:
            on = smax >= self.theta
            self._eval_on.append(on)
            mask = on.float()
        return self._route(batch, self._context(z, frozen, mask))

    # -- records --------------------------------------------------------------------------------
    def statistics(self) -> dict:
        stats = {**self.expert_statistics(), **self._stats}
        if not self.opts.no_selector:  # unconditional: every DDP rank joins the sum, even with an empty shard
            on = torch.cat(self._eval_on) if self._eval_on else torch.zeros(0, dtype=torch.bool, device=self._device)
            n, off = summed_over_ranks(torch.stack([on.new_tensor(len(on), dtype=torch.long), (~on).sum()])).tolist()
            if n:
                stats["selector"] = {"test_images": n, "original_clip": off}
        return stats
