"""DDAS-style task selection for `moe-adapters` (Yu et al., CVPR 2024), on frozen CLIP features.

One small autoencoder per task is fitted on the task's frozen image features after the task is
trained. At test time the task whose autoencoder reconstructs a sample best picks the sample's
router; if that best error is above the task's threshold, or an optional reference autoencoder
(fitted once on generic images) reconstructs the sample better, the sample goes to the original
CLIP with the adapters off. (choice) The original uses AlexNet features; frozen CLIP features
serve here. The threshold is a quantile of the task's own training errors unless given.

Two ways to decide (`decision`): per sample (ours: a test batch may mix tasks), or per batch, as
the original's MTIL evaluation does: each autoencoder's error is averaged over the batch, the
lowest picks one router for the whole batch, and a batch whose lowest mean error is above the
threshold (the original: one absolute value, 0.0655 on its sigmoid AlexNet features) goes to the
original CLIP. Our evaluation batches hold one test set each, as the original's loaders do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Autoencoder(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.enc = nn.Linear(dim, hidden)
        self.dec = nn.Linear(hidden, dim)
        self.register_buffer("threshold", torch.tensor(float("inf")))
        self.register_buffer("fitted", torch.tensor(False))
        self.requires_grad_(False)

    def error(self, f: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared reconstruction error, [B]."""
        return (self.dec(F.relu(self.enc(f))) - f).pow(2).mean(-1)

    @torch.enable_grad()
    def fit(self, features: torch.Tensor, epochs: int, lr: float, seed: int, batch_size: int = 256) -> torch.Tensor:
        """Train on [N, D] features (own Adam, own seeded order); returns the training errors."""
        features = features.to(self.enc.weight.device, torch.float32)
        self.requires_grad_(True)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(features), generator=gen).split(batch_size):
                loss = self.error(features[idx.to(features.device)]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.requires_grad_(False)
        for p in self.parameters():
            p.grad = None
        self.fitted.fill_(True)
        with torch.no_grad():
            return torch.cat([self.error(chunk) for chunk in features.split(4096)])


class TaskSelector(nn.Module):
    def __init__(self, dim: int, hidden: int = 128, epochs: int = 30, lr: float = 1e-3, quantile: float = 0.99,
                 threshold: float | None = None, reference: bool = False, decision: str = "sample"):
        super().__init__()
        self.decision = decision
        self.dim, self.hidden, self.epochs, self.lr = dim, hidden, epochs, lr
        self.quantile, self.fixed_threshold = quantile, threshold
        self.tasks = nn.ModuleList()
        self.reference = Autoencoder(dim, hidden) if reference else None

    def add_task(self, device) -> None:
        """Structural: one (unfitted) autoencoder for a new task."""
        self.tasks.append(Autoencoder(self.dim, self.hidden).to(device))

    def fit_task(self, t: int, features: torch.Tensor, seed: int) -> float:
        errors = self.tasks[t].fit(features, self.epochs, self.lr, seed)
        threshold = self.fixed_threshold if self.fixed_threshold is not None else \
            float(torch.quantile(errors.float().cpu(), self.quantile))
        self.tasks[t].threshold.fill_(threshold)
        return threshold

    def fit_reference(self, features: torch.Tensor, seed: int) -> None:
        if self.reference is not None and not bool(self.reference.fitted):
            self.reference.fit(features, self.epochs, self.lr, seed)

    def choose(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f [B, D] frozen features -> (task index [B], adapters on [B] bool); fp32 under autocast,
        as the thresholds were fitted."""
        with torch.autocast(f.device.type, enabled=False):
            return self._choose(f)

    def _choose(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        errors = torch.stack([ae.error(f.float()) for ae in self.tasks], dim=1)  # [B, T]: a loop over tasks
        reference = self.reference.error(f.float()) if self.reference is not None and bool(self.reference.fitted) \
            else None
        if self.decision == "batch":  # one decision from the batch's mean errors, given to every sample
            errors = errors.mean(0, keepdim=True).expand_as(errors)
            reference = None if reference is None else reference.mean().expand_as(reference)
        best, task = errors.min(dim=1)
        thresholds = torch.stack([ae.threshold for ae in self.tasks])
        on = best <= thresholds[task]
        if reference is not None:
            on &= best < reference
        return task, on
