"""MAGE's view of an attribute pool: the active pool of a step, the attribute feature z of an image,
the attribute-confidence statistics of the selector, and per-class / per-domain attribute means.

Matching runs on frozen CLIP features against the active attributes only (future class and domain
names are unknown in continual learning): s = A . f(x); per kind the top-k, w = softmax(s / tau),
a = sum w_j A_j. (choice) a is centred on the mean of the attributes active at the first step (a
fixed vector), so z carries what distinguishes an image's attributes rather than the direction
that all attribute embeddings of a text tower share. z = [a_cls ; a_dom].
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UserError

log = logging.getLogger(__name__)

KINDS = ("class", "domain", "both")


class AttributeMatcher:
    def __init__(self, pool, kind: str = "both", top_k: int = 5, tau: float = 0.05):
        if kind not in KINDS:
            raise UserError(f"--opt attr_kind={kind}: use class, domain or both")
        if top_k < 1:
            raise UserError("--opt attr_topk must be at least 1")
        if tau <= 0:
            raise UserError("--opt tau must be positive")
        self.pool, self.top_k, self.tau = pool, top_k, tau
        self.use = (kind in ("class", "both"), kind in ("domain", "both"))
        self.emb = F.normalize(torch.from_numpy(np.asarray(pool.embeddings, np.float32)), dim=-1)
        self.kinds = np.asarray(pool.kinds)
        self.by_source: dict[str, list[int]] = {}
        for i, names in enumerate(pool.sources):
            for name in names:
                self.by_source.setdefault(name, []).append(i)
        self.dim = self.emb.shape[1]
        self.center = torch.zeros(2, self.dim)
        self.active_ids = torch.zeros(0, dtype=torch.long)
        self._set_active(np.zeros(len(self.kinds), bool))

    def to(self, device) -> "AttributeMatcher":
        self.emb, self.center = self.emb.to(device), self.center.to(device)
        self._set_active(self._active)
        return self

    # -- the active pool ------------------------------------------------------------------------
    def activate(self, names: set[str]) -> None:
        """Attributes whose sources include one of `names` (classes and domains seen so far)."""
        mask = np.zeros(len(self.kinds), bool)
        for name in names:
            mask[self.by_source.get(name, [])] = True
        self._set_active(mask)

    def _set_active(self, mask: np.ndarray) -> None:
        self._active = mask
        ids = np.flatnonzero(mask)
        device = self.emb.device
        self.active_ids = torch.from_numpy(ids).to(device)
        self.active_emb = self.emb[self.active_ids]
        self.kind_masks = [torch.from_numpy(self.kinds[ids] == k).to(device) for k in ("class", "domain")]
        self.counts = [int((self.kinds[ids] == k).sum()) for k in ("class", "domain")]

    def set_center(self) -> None:
        """Fix the centre to the mean of the currently active attributes of each kind."""
        for j, mask in enumerate(self.kind_masks):
            if self.counts[j]:
                self.center[j] = self.active_emb[mask].mean(0)

    # -- matching -------------------------------------------------------------------------------
    def match(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """f [B, D] frozen features -> (z [B, 2D], max similarity to an active class attribute [B],
        top-1 attribute id per kind (pool ids) or None). Always fp32, also under autocast: the
        selector compares these similarities with a threshold fitted in fp32."""
        with torch.autocast(f.device.type, enabled=False):
            return self._match(f)

    def _match(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        s = f.float() @ self.active_emb.T  # [B, M_active]
        parts, top1 = [], []
        smax = torch.ones(len(f), device=f.device)
        for j, mask in enumerate(self.kind_masks):
            if not self.counts[j]:
                parts.append(torch.zeros(len(f), self.dim, device=f.device))
                top1.append(None)
                continue
            masked = s.masked_fill(~mask, float("-inf"))
            top = masked.topk(min(self.top_k, self.counts[j]), dim=1)
            w = (top.values / self.tau).softmax(dim=1)
            a = torch.einsum("bk,bkd->bd", w, self.active_emb[top.indices]) - self.center[j]
            parts.append(a if self.use[j] else torch.zeros_like(a))
            top1.append(self.active_ids[top.indices[:, 0]])
            if j == 0:
                smax = top.values[:, 0]
        return torch.cat(parts, dim=1), smax, top1

    # -- means of a class / domain ----------------------------------------------------------------
    def mean_of(self, name: str, kind: str) -> torch.Tensor | None:
        ids = [i for i in self.by_source.get(name, []) if self.kinds[i] == kind]
        return self.emb[ids].mean(0) if ids else None

    def anchor_rows(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """Data-free attribute features of (class, domain) pairs: [K, 2D], same centring and kind
        selection as `match`."""
        rows = []
        for cls, dom in pairs:
            parts = []
            for j, (name, kind) in enumerate(((cls, "class"), (dom, "domain"))):
                mean = self.mean_of(name, kind)
                part = torch.zeros(self.dim, device=self.emb.device) if mean is None or not self.use[j] \
                    else mean - self.center[j]
                parts.append(part)
            rows.append(torch.cat(parts))
        return torch.stack(rows) if rows else torch.zeros(0, 2 * self.dim, device=self.emb.device)

    def top_texts(self, ids: torch.Tensor, n: int = 5) -> list[list]:
        """The n most frequent attributes among pool ids, as [text, count]."""
        return [[self.pool.texts[i], c] for i, c in Counter(ids.tolist()).most_common(n)]


class ConfidenceHistogram:
    """Max similarity to an active class attribute of every training image seen so far, as a
    histogram over [-1, 1] (a fixed-size tensor, so it fits in a safetensors checkpoint)."""

    BINS = 4000

    @staticmethod
    def empty(device=None) -> torch.Tensor:
        return torch.zeros(ConfidenceHistogram.BINS, dtype=torch.float64, device=device)

    @staticmethod
    def add(hist: torch.Tensor, values: torch.Tensor) -> None:
        b = ConfidenceHistogram.BINS
        idx = ((values.double().clamp(-1, 1) + 1) / 2 * b).long().clamp(0, b - 1)
        hist.index_add_(0, idx.to(hist.device), torch.ones(len(idx), dtype=hist.dtype, device=hist.device))

    @staticmethod
    def quantile(hist: torch.Tensor, q: float) -> float:
        total = float(hist.sum())
        if total == 0:
            return float("-inf")
        first = int(torch.searchsorted(hist.cumsum(0), torch.tensor(q * total, dtype=hist.dtype, device=hist.device)))
        return -1 + 2 * first / ConfidenceHistogram.BINS
