"""Mixture-of-experts adapters inside open_clip's transformer blocks (methods.md, "the MoE adapter layer").

Each chosen block is replaced by an `AdaptedBlock` that holds the original, frozen block and adds

    x = x + Attn(LN1(x));  c = x[:, 0]
    x = x + MLP(LN2(x)) + sum_i g_i * s * Up_i(Dropout(ReLU(Down_i(x))))

with per-sample gates g from a router over c (plus an optional extra routing input, e.g. MAGE's
attribute feature). E = 1 with no router is a plain adapter (the `finetune` baseline).

Dispatch is batched without host syncs: each sample gathers the weights of its top-k experts and
runs them with one batched matmul, so compute grows with k, not with E. Routers are not owned by
the layer: a method hands each layer the gate logits through `RoutingContext`, which lets per-task
routers (moe-adapters) and shared attribute-guided routers (mage) use the same layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RoutingContext:
    """What the layers of one forward pass share: the router callback and the gates they chose.

    `router(layer_index, cls_token)` returns gate logits [B, E] (noise already added in training);
    None means every sample uses expert 0 with weight 1. Gates are recorded per layer for
    load-balancing losses and usage statistics."""

    router: object = None
    top_k: int = 1
    gates: list = field(default_factory=list)  # per layer: (weights [B, k], indices [B, k], probs [B, E] | None)


class ExpertBank(nn.Module):
    """E bottleneck adapters d -> r -> d with Down kaiming-initialised and Up zero-initialised."""

    def __init__(self, d: int, num_experts: int, rank: int = 64, scale: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Parameter(torch.empty(num_experts, d, rank))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, rank))
        self.up = nn.Parameter(torch.zeros(num_experts, rank, d))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, d))
        for e in range(num_experts):  # kaiming on each expert's [r, d] weight, as nn.Linear would
            nn.init.kaiming_uniform_(self.down.data[e].T, a=math.sqrt(5))
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    @property
    def num_experts(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [B, N, d]; weights, indices [B, k]: sum_k weights * expert_k(x), batched over samples."""
        if self.num_experts == 1:  # dense adapter: no gather needed
            h = self.dropout(F.relu(x @ self.down[0] + self.down_bias[0]))
            return self.scale * weights[:, :1, None] * (h @ self.up[0] + self.up_bias[0])
        down, up = self.down[indices], self.up[indices]  # [B, k, d, r], [B, k, r, d]
        h = torch.einsum("bnd,bkdr->bknr", x, down) + self.down_bias[indices][:, :, None, :]
        h = self.dropout(F.relu(h))
        y = torch.einsum("bknr,bkrd->bknd", h, up) + self.up_bias[indices][:, :, None, :]
        return self.scale * torch.einsum("bk,bknd->bnd", weights.to(y.dtype), y)


class AdaptedBlock(nn.Module):
    """An open_clip ResidualAttentionBlock (frozen, untouched) plus an expert bank."""

    def __init__(self, block: nn.Module, experts: ExpertBank, layer_index: int, batch_first: bool):
        super().__init__()
        self.block = block
        self.experts = experts
        self.layer_index = layer_index
        self.batch_first = batch_first
        self.context: RoutingContext | None = None  # set by `Adapters.routing` around a forward
        self.enabled = True

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        b = self.block
        if not self.enabled or self.context is None:
            return b(q_x, k_x, v_x, attn_mask=attn_mask)
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), attn_mask=attn_mask))
        cls = x[:, 0] if self.batch_first else x[0]
        weights, indices = self._gates(cls)
        xb = x if self.batch_first else x.transpose(0, 1)
        delta = self.experts(xb, weights, indices)
        if not self.batch_first:
            delta = delta.transpose(0, 1)
        return x + b.ls_2(b.mlp(b.ln_2(x))) + delta.to(x.dtype)

    def _gates(self, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.context
        if ctx.router is None:
            ones = torch.ones(cls.shape[0], 1, device=cls.device, dtype=torch.float32)
            zeros = torch.zeros(cls.shape[0], 1, device=cls.device, dtype=torch.long)
            ctx.gates.append((ones, zeros, None))
            return ones, zeros
        logits = ctx.router(self.layer_index, cls).float()  # [B, E]
        top, indices = logits.topk(ctx.top_k, dim=-1)
        weights = top.softmax(dim=-1)
        ctx.gates.append((weights, indices, logits))
        return weights, indices


class Adapters(nn.Module):
    """Expert banks in the chosen blocks of a CLIP image tower, inserted by module replacement."""

    def __init__(self, clip_model: nn.Module, num_experts: int = 1, rank: int = 64, scale: float = 0.1,
                 dropout: float = 0.0, layers: list[int] | None = None):
        super().__init__()
        transformer = clip_model.visual.transformer
        blocks = transformer.resblocks
        chosen = list(range(len(blocks))) if layers is None else layers
        width = transformer.width
        self.banks = nn.ModuleList()
        self._blocks: list[AdaptedBlock] = []
        for i in chosen:
            if isinstance(blocks[i], AdaptedBlock):
                raise ValueError(f"block {i} already carries adapters")
            bank = ExpertBank(width, num_experts, rank, scale, dropout)
            adapted = AdaptedBlock(blocks[i], bank, len(self._blocks), transformer.batch_first)
            blocks[i] = adapted
            self.banks.append(bank)
            self._blocks.append(adapted)
        self.num_experts, self.width = num_experts, width

    @property
    def num_layers(self) -> int:
        return len(self.banks)

    def routing(self, ctx: RoutingContext | None):
        """Context manager: the layers route with `ctx` inside it; None turns the adapters off."""
        return _Routing(self._blocks, ctx)


class _Routing:
    def __init__(self, blocks, ctx):
        self.blocks, self.ctx = blocks, ctx

    def __enter__(self):
        for b in self.blocks:
            b.context = self.ctx
        return self.ctx

    def __exit__(self, *exc):
        for b in self.blocks:
            b.context = None


def load_balancing_loss(gates: list, num_experts: int) -> torch.Tensor:
    """Shazeer et al. 2017: cv^2(importance) + cv^2(load), averaged over layers.

    importance = summed gate weights per expert (differentiable); load = samples routed per expert."""
    terms = []
    for weights, indices, logits in gates:
        if logits is None:
            continue
        importance = torch.zeros(weights.shape[0], num_experts, device=weights.device).scatter_add(
            1, indices, weights.float()).sum(0)
        load = torch.zeros_like(importance).scatter_add(0, indices.reshape(-1),
                                                        torch.ones(indices.numel(), device=weights.device))
        terms.append(_cv2(importance) + _cv2(load))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def _cv2(v: torch.Tensor) -> torch.Tensor:
    return v.float().var(unbiased=False) / (v.float().mean() ** 2 + 1e-10)
