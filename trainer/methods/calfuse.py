"""`calfuse` (Guo et al. 2025, this project's reconstruction; docs/methods.md#calfuse):
dynamic feature calibration and QR parameter fusion on cached frozen CLIP features.

The model is a D x D projection A on the frozen, L2-normalised image feature f(x) and a learned
calibration between the original and the projected feature:

    g(x)     = normalise(alpha(x) * f(x) + (1 - alpha(x)) * normalise(A f(x)))
    alpha(x) = sigmoid(kappa * (H_adapt(x) - H_orig(x)) + b)
    logits   = 100 * g(x) . t_c                   over the vocabulary asked for

H is the entropy of the prediction softmax(100 f . t_c) over the classes seen so far, with the
original (H_orig) and the projected (H_adapt) feature. Where the projected feature is less certain
than original CLIP the model leans on original CLIP (kappa > 0 at init). Nothing re-encodes images:
the whole scenario trains and evaluates on the engine's cached features.

A training step
---------------
1. `begin_step`: remember A as it enters the step (W_old), grow the replay tables to this step's
   rows (structural only: a resumed run replays it before loading the checkpoint).
2. `forward`: each batch of real features is joined by `replay_ratio` x B pseudo-features drawn
   from the Gaussian statistics of earlier steps (old classes, and old domains of current
   classes); loss = cross-entropy over all seen classes on real + pseudo features
   + `hinge_weight` * mean relu(-cos(g, t_pos) + cos(g, t_neg) + margin) over the negatives
   whose class text embedding lies closer than `hinge_distance` (cosine distance) to the target's.
3. `end_step`: QR fusion of the trained A (W_new) with W_old (`qr_fuse`), then the step's
   per-class feature statistics are merged into the replay tables (`class_moments`,
   `merge_moments`), from the cached features of the step's training split.

Choices (docs/methods.md#calfuse marks them; each alternative is an option)
---------------------------------------------------------------
- alpha: dynamic entropy gate with learned kappa and b (default). The entropies enter the gate
  detached (`detach_entropy`): the gate learns which feature to trust without teaching A to be
  over-confident to win it. `calibration=fixed` uses a constant `alpha` instead.
- A enters each step as the fused A of the step before (`projection_init=previous`), so W_new - W_old
  is what this step learnt and the fusion mask damps the small, incidental changes.
  `projection_init=identity` reads "task-specific" literally: A restarts from I at each step and
  the fusion merges it with the old A.
- Fusion also runs after the first step, against the identity that A started from: the mask then
  pulls the first step's small changes back toward original CLIP. `fusion=none` keeps A as trained.
- Replay statistics are kept per class (`replay_key=class`, merged over domains with Chan's
  pooled update) or per (domain, class) (`replay_key=domain`: one Gaussian per domain a class was
  seen in, closer to the true multi-modal distribution in domain steps). Covariances are full
  per row (`replay_cov=class`; D x D floats per row: 1 MiB at D = 512) or one pooled within-row
  covariance (`replay_cov=shared`, for many classes or wide backbones). The sample covariance is
  shrunk toward a scaled identity: (1 - s) S + s * tr(S)/D * I, s = `replay_shrinkage`; few images
  per class make S singular. Pseudo-features are L2-normalised like real ones (`replay_normalize`).
- Old rows are drawn equally often (every old class counts the same, however many images it had).

Options (`--opt key=value`)
---------------------------
Declared, with defaults and one line of help each, in `CalFuse.Options` (`uniil methods show calfuse`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ..sources import cached_features
from .base import Batch, ContinualMethod, StepData, label_smoothing_option, opt, register_method

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0


# -- pure math: tests call these directly ------------------------------------------------------------
def fusion_mask(p: torch.Tensor, r: torch.Tensor, mu: float = 0.6) -> torch.Tensor:
    """M = clamp(|P - R| / max|P - R| + mu, max = 1); all ones where P = R everywhere (nothing to fuse)."""
    d = (p - r).abs()
    top = d.max() if d.numel() else d.new_zeros(())
    if float(top) == 0.0:
        return torch.ones_like(d)
    return torch.clamp(d / top + mu, max=1.0)


def qr_fuse(w_old: torch.Tensor, w_new: torch.Tensor, mu: float = 0.6,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QR parameter fusion of a layer's weights [D, K] (docs/methods.md#calfuse-qr-fusion).

    W_old = Q R (reduced QR), P = Q^T W_new, M = fusion_mask(P, R, mu) unless `mask` is given,
    W = Q (M * P + (1 - M) * R) + (I - Q Q^T) W_new. Returns (W, Q, M). M = 1 gives W_new; M = 0
    gives W_old plus the part of W_new outside the column space of W_old. Computed in float64."""
    if w_old.shape != w_new.shape or w_old.dim() != 2:
        raise ValueError(f"qr_fuse needs two matrices of one shape, got {tuple(w_old.shape)} and {tuple(w_new.shape)}")
    old, new = w_old.double(), w_new.double()
    q, r = torch.linalg.qr(old, mode="reduced")
    p = q.T @ new
    m = fusion_mask(p, r, mu) if mask is None else mask.to(p.dtype).expand_as(p)
    outside = new - q @ p  # (I - Q Q^T) W_new
    w = q @ (m * p + (1.0 - m) * r) + outside
    return w.to(w_new.dtype), q.to(w_new.dtype), m.to(w_new.dtype)


def class_moments(features: torch.Tensor, rows: torch.Tensor, num_rows: int):
    """Per-row count [R], mean [R, D] and scatter sum (x - mean)(x - mean)^T [R, D, D] of features
    [N, D] whose row index is `rows` [N] (rows without data: zeros). Float64; one D x D product per
    row present, never an [N, D, D] tensor."""
    x = features.double()
    d = x.shape[1]
    count = torch.zeros(num_rows, dtype=torch.float64, device=x.device).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
    total = torch.zeros(num_rows, d, dtype=torch.float64, device=x.device).index_add_(0, rows, x)
    mean = total / count.clamp(min=1.0)[:, None]
    centred = x - mean[rows]
    scatter = torch.zeros(num_rows, d, d, dtype=torch.float64, device=x.device)
    order = torch.argsort(rows, stable=True)
    present = torch.nonzero(count > 0).flatten().tolist()
    for r, part in zip(present, torch.split(centred[order], count[present].long().tolist())):
        scatter[r] = part.T @ part
    return count, mean, scatter


def merge_moments(n1: torch.Tensor, mean1: torch.Tensor, n2: torch.Tensor, mean2: torch.Tensor,
                  scatter2: torch.Tensor):
    """Chan's pooled update of (count, mean, scatter) per row: returns (n, mean, increment) with
    scatter_merged = scatter1 + increment. Shapes [R], [R, D], [R], [R, D], [R, D, D]."""
    n = n1 + n2
    w = torch.where(n > 0, n2 / n.clamp(min=1e-12), torch.zeros_like(n))
    delta = mean2 - mean1
    mean = mean1 + w[:, None] * delta
    between = torch.where(n > 0, n1 * n2 / n.clamp(min=1e-12), torch.zeros_like(n))
    return n, mean, scatter2 + between[:, None, None] * delta[:, :, None] * delta[:, None, :]


def shrunk_covariance(scatter: torch.Tensor, dof: torch.Tensor, shrinkage: float, floor: float = 1e-6) -> torch.Tensor:
    """(1 - s) S / dof + s * tr(S / dof) / D * I (+ floor * I), per row: scatter [R, D, D], dof [R]."""
    d = scatter.shape[-1]
    cov = scatter / dof.clamp(min=1.0)[:, None, None]
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1.0 - shrinkage) * cov + (shrinkage * scale + floor)[:, None, None] * eye


def calibration_alpha(h_orig: torch.Tensor, h_adapt: torch.Tensor, kappa: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """alpha = sigmoid(kappa * (H_adapt - H_orig) + b). The argument is clamped to [-12, 12], so alpha
    stays strictly inside (0, 1) (within 7e-6 of the ends) even in float32 and for a large kappa."""
    return torch.sigmoid(torch.clamp(kappa * (h_adapt - h_orig) + bias, -12.0, 12.0))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def confusable_pairs(text: torch.Tensor, distance: float) -> torch.Tensor:
    """[C, C] bool: class pairs (c != c') whose text embeddings are closer than `distance` in cosine distance."""
    t = F.normalize(text.float(), dim=-1)
    close = (1.0 - t @ t.T) < distance
    close.fill_diagonal_(False)
    return close


# -- the method -------------------------------------------------------------------------------------
@register_method("calfuse")
class CalFuse(ContinualMethod):
    """Guo et al. 2025 (a reconstruction): entropy-gated feature calibration, QR fusion, Gaussian replay."""

    @dataclass(frozen=True)
    class Options(ContinualMethod.Options):
        calibration: str = opt("dynamic", "alpha(x): the learned entropy gate, or a constant alpha",
                               choices=("dynamic", "fixed"))
        alpha: float = opt(0.5, "the constant alpha of calibration=fixed, in (0, 1)")
        kappa_init: float = opt(1.0, "initial kappa of the entropy gate")
        bias_init: float = opt(0.0, "initial b of the entropy gate (0: alpha = 0.5 while A = I)")
        detach_entropy: bool = opt(True, "the entropies enter the gate detached")
        fusion: str = opt("qr", "QR parameter fusion of A after each step, or none", choices=("qr", "none"))
        mu: float = opt(0.6, "fusion mask offset mu", minimum=0)
        projection_init: str = opt("previous", "A enters a step as the fused A before it, or as I",
                                   choices=("previous", "identity"))
        replay: bool = opt(True, "Gaussian replay of earlier steps' feature statistics")
        replay_ratio: float = opt(1.0, "pseudo-features per real feature in a batch", minimum=0)
        replay_key: str = opt("class", "one Gaussian per class, or per (domain, class)", choices=("class", "domain"))
        replay_cov: str = opt("class", "a full covariance per row, or one pooled covariance",
                              choices=("class", "shared"))
        replay_shrinkage: float = opt(0.1, "covariance shrinkage s toward a scaled identity", fraction=True)
        replay_normalize: bool = opt(True, "pseudo-features are L2-normalised like real ones")
        hinge_weight: float = opt(1.0, "weight of the hinge on confusable classes (0 turns it off)", minimum=0)
        hinge_distance: float = opt(0.55, "cosine distance below which two classes are confusable")
        hinge_margin: float = opt(0.1, "hinge margin", minimum=0)
        label_smoothing: float = label_smoothing_option()

        def check(self) -> None:
            if self.calibration == "fixed" and not 0.0 < self.alpha < 1.0:
                raise UserError(f"--opt alpha={self.alpha}: must lie in (0, 1)")

    uses_frozen_features = True

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        o = self.opts
        d = int(text.shape[1])
        self.dim = d
        dynamic = o.calibration == "dynamic"
        self.A = nn.Parameter(torch.eye(d))
        self.kappa = nn.Parameter(torch.tensor([float(o.kappa_init)]), requires_grad=dynamic)
        self.bias = nn.Parameter(torch.tensor([float(o.bias_init)]), requires_grad=dynamic)
        # Replay tables, one row per key (class, or (domain, class)); grown in begin_step.
        self.register_buffer("replay_label", torch.zeros(0, dtype=torch.long))
        self.register_buffer("replay_count", torch.zeros(0))
        self.register_buffer("replay_mean", torch.zeros(0, d))
        shared = o.replay_cov == "shared"
        self.register_buffer("replay_scatter", torch.zeros(1 if shared else 0, d, d))
        self.row_keys: list = []
        self.seen = torch.arange(len(text))  # replaced by the seen classes in begin_step
        self.w_old: torch.Tensor | None = None
        self._sampler = None  # (rows, means, cholesky factors) of the current step, built lazily
        self._confusable = None
        self._alpha_sum = None
        self._alpha_n = 0
        self._stats: dict = {}

    # -- structure ------------------------------------------------------------------------------
    def _key(self, domain: str, cls: int):
        return cls if self.opts.replay_key == "class" else f"{domain}|{cls}"

    def begin_step(self, t: int, data: StepData) -> None:
        self.seen = data.seen_classes.detach().to(self.A.device)
        new_keys = [k for k in dict.fromkeys(self._key(data.step.domain, int(c)) for c in data.classes.tolist())
                    if k not in self.row_keys]
        if new_keys:
            dev, d, r = self.A.device, self.dim, len(new_keys)
            self.row_keys += new_keys
            labels = torch.tensor([k if isinstance(k, int) else int(k.rsplit("|", 1)[1]) for k in new_keys], device=dev)
            self.replay_label = torch.cat([self.replay_label, labels])
            self.replay_count = torch.cat([self.replay_count, torch.zeros(r, device=dev)])
            self.replay_mean = torch.cat([self.replay_mean, torch.zeros(r, d, device=dev)])
            if self.opts.replay_cov == "class":
                self.replay_scatter = torch.cat([self.replay_scatter, torch.zeros(r, d, d, device=dev)])
        if self.opts.projection_init == "identity":
            with torch.no_grad():
                self.w_old = self.A.detach().clone()
                self.A.copy_(torch.eye(self.dim, device=self.A.device))
        else:
            self.w_old = None  # taken at the first forward: after a resume A is loaded only later
        self._sampler = self._confusable = None
        self._alpha_sum, self._alpha_n = None, 0

    # -- the model ------------------------------------------------------------------------------
    def calibrate(self, f: torch.Tensor, vocab: torch.Tensor, with_cosines: bool = False):
        """(g, alpha) for frozen features f [B, D], entropies over the classes `vocab`; with
        `with_cosines` also cos(g, t_c) [B, len(vocab)].

        One matmul gives the original and the projected features' logits together, and g's
        cosines follow from them without another: g . t = (alpha f . t + (1 - alpha) fa . t) / |mix|.
        Every matmul counts on a busy CPU (each waits for the intra-op threads)."""
        f = f.float()
        fa = F.normalize(f @ self.A.T.to(f.dtype), dim=-1).float()
        dynamic = self.opts.calibration == "dynamic"
        cos_f = cos_a = None
        if dynamic or with_cosines:
            t = self.text[vocab].float()
            cos_f, cos_a = (torch.cat([f, fa]) @ t.T).float().split(len(f))
        if dynamic:
            h_orig, h_adapt = entropy(LOGIT_SCALE * cos_f), entropy(LOGIT_SCALE * cos_a)
            if self.opts.detach_entropy:
                h_orig, h_adapt = h_orig.detach(), h_adapt.detach()
            alpha = calibration_alpha(h_orig, h_adapt, self.kappa.float(), self.bias.float())[:, None]
        else:
            alpha = torch.full((len(f), 1), self.opts.alpha, device=f.device)
        mix = alpha * f + (1.0 - alpha) * fa
        norm = mix.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        g = mix / norm
        if not with_cosines:
            return g, alpha
        return g, alpha, (alpha * cos_f + (1.0 - alpha) * cos_a) / norm

    def encode(self, batch: Batch) -> torch.Tensor:
        if batch.features is None:
            raise UserError("calfuse works on cached frozen features; the engine gave it images")
        g, _ = self.calibrate(batch.features.to(self.A.device), self.seen)
        return g

    def logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * features.float() @ self.text[classes].float().T

    def forward(self, batch: Batch, data: StepData) -> torch.Tensor:
        if self.w_old is None:
            self.w_old = self.A.detach().clone()
        seen = data.seen_classes
        f, y = batch.features.to(self.A.device).float(), batch.targets.to(self.A.device)
        n_pseudo = int(round(self.opts.replay_ratio * len(f))) if self.opts.replay else 0
        if n_pseudo:
            pf, py = self.sample_pseudo(n_pseudo)
            if len(pf):
                f, y = torch.cat([f, pf]), torch.cat([y, py])
        _, alpha, cos = self.calibrate(f, seen, with_cosines=True)  # cos [B, S] = g . t_c over the seen classes
        self._alpha_sum = alpha.detach().sum() + (self._alpha_sum if self._alpha_sum is not None else 0.0)
        self._alpha_n += len(alpha)
        pos = self.positions(y, seen)
        loss = F.cross_entropy(LOGIT_SCALE * cos, pos, label_smoothing=self.opts.label_smoothing)
        if self.opts.hinge_weight > 0:
            loss = loss + self.opts.hinge_weight * self._hinge(cos, pos, seen)
        return loss

    def _hinge(self, cos: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        if self._confusable is None:
            self._confusable = confusable_pairs(self.text[seen], self.opts.hinge_distance)
        neg = self._confusable[pos]  # [B, S]: confusable negatives of each sample's class
        margins = F.relu(-cos.gather(1, pos[:, None]) + cos + self.opts.hinge_margin)
        return (margins * neg).sum() / neg.sum().clamp(min=1)

    # -- replay ---------------------------------------------------------------------------------
    def _build_sampler(self):
        with torch.autocast(device_type=self.A.device.type, enabled=False):
            rows = torch.nonzero(self.replay_count > 0).flatten()
            if len(rows) == 0:
                return rows, None, None
            count = self.replay_count[rows].double()
            if self.opts.replay_cov == "class":
                scatter, dof = self.replay_scatter[rows].double(), count - 1
            else:
                scatter = self.replay_scatter.double()
                dof = (self.replay_count.double() - 1).clamp(min=0).sum().reshape(1)
            cov = shrunk_covariance(scatter, dof, self.opts.replay_shrinkage)
            chol, info = torch.linalg.cholesky_ex(cov)
            if bool((info != 0).any()):  # numerically not positive definite: add jitter
                eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
                chol = torch.linalg.cholesky(cov + 1e-4 * eye)
            return rows, self.replay_mean[rows].float(), chol.float()

    def sample_pseudo(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n pseudo-features (and their global labels) from the stored Gaussians, stratified over
        the old rows: with R rows, ceil(n / R) draws per row, of which n are kept at random (so
        each row is drawn equally often, up to one; a random subset of rows when R > n). No
        per-sample D x D factor is gathered: memory R * ceil(n / R) * D."""
        if self._sampler is None:
            self._sampler = self._build_sampler()
        rows, means, chol = self._sampler
        if means is None:
            return torch.zeros(0, self.dim, device=self.A.device), torch.zeros(0, dtype=torch.long, device=self.A.device)
        r = len(rows)
        k = -(-n // r)
        z = torch.randn(r, k, self.dim, device=means.device)  # the device's generator: torch.manual_seed seeds it
        x = means[:, None, :] + z @ chol.transpose(-1, -2)  # [R, k, D]; a shared factor broadcasts
        keep = torch.randperm(r * k, device=means.device)[:n]
        x = x.reshape(r * k, self.dim)[keep]
        if self.opts.replay_normalize:
            x = F.normalize(x, dim=-1)
        return x, self.replay_label[rows].repeat_interleave(k)[keep]

    @torch.no_grad()
    def end_step(self, t: int, data: StepData) -> None:
        w_old = self.w_old if self.w_old is not None else self.A.detach().clone()
        mask_mean = None
        if self.opts.fusion == "qr":
            fused, _, m = qr_fuse(w_old.float(), self.A.detach().float(), self.opts.mu)
            self.A.copy_(fused)
            mask_mean = float(m.mean())
        self._update_replay(data)
        alpha = float(self._alpha_sum) / self._alpha_n if self._alpha_n else None
        self._stats = {"alpha_mean": alpha, "fusion_mask_mean": mask_mean,
                       "projection_change": float((self.A.detach() - w_old).norm()),
                       "replay_rows": int((self.replay_count > 0).sum()),
                       "confusable_pairs": int(confusable_pairs(self.text[data.seen_classes],
                                                                self.opts.hinge_distance).sum()) // 2}
        self.w_old = None
        log.debug("calfuse step %d: %s", t + 1, self._stats)

    def _update_replay(self, data: StepData) -> None:
        feats, labels = self._step_features(data)
        if len(feats) == 0:
            return
        row_of = {k: i for i, k in enumerate(self.row_keys)}
        rows = torch.tensor([row_of[self._key(data.step.domain, int(c))] for c in labels.tolist()], device=feats.device)
        n2, mean2, scatter2 = class_moments(feats, rows, len(self.row_keys))
        n, mean, inc = merge_moments(self.replay_count.double(), self.replay_mean.double(), n2, mean2, scatter2)
        self.replay_count.copy_(n.float())
        self.replay_mean.copy_(mean.float())
        if self.opts.replay_cov == "class":
            self.replay_scatter.add_(inc.float())
        else:
            self.replay_scatter.add_(inc.sum(0, keepdim=True).float())

    def _step_features(self, data: StepData) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's cached training features (the ones the engine trained on) and global labels."""
        source = data.train_source
        if source is None:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.long)
        to_global = dict(zip(data.step.labels, data.classes.tolist()))
        feats = cached_features(source, self.clip.spec, str(self.A.device)).to(self.A.device)
        return feats, torch.tensor([to_global[y] for y in source.labels], dtype=torch.long, device=self.A.device)

    # -- checkpoint state -----------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"row_keys": list(self.row_keys)}

    def load_extra_state(self, state: dict) -> None:
        keys = state.get("row_keys")
        if keys is not None and list(keys) != list(self.row_keys):
            raise UserError("calfuse: the checkpoint's replay rows do not match this scenario; start a new --out directory")
        self._sampler = self._confusable = None

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(state)
        self._sampler = None

    def statistics(self) -> dict:
        return dict(self._stats)
