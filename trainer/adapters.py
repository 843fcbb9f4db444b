"""Mixture-of-experts adapters inside open_clip's transformer blocks (docs/methods.md#moe-layer).

Each chosen block is replaced by an `AdaptedBlock` that holds the original, frozen block and adds

    x = x + Attn(LN1(x));  c = x[:, 0]
    x = x + MLP(LN2(x)) + sum_i g_i * s * Up_i(Dropout(ReLU(Down_i(x))))

with per-sample gates g from a router over c (plus an optional extra routing input, e.g. MAGE's
attribute feature). E = 1 with no router is a plain adapter (the `finetune` baseline).

Dispatch is batched, with no host syncs and no Python loop over experts, so compute grows with k,
not with E: either each sample gathers the weights of its top-k experts and runs them as one
adapter of rank k*r (gates folded into the hidden units) with two bmm, or, on CPU with few
tokens per sample, the (sample, expert) pairs are sorted by expert and run as grouped GEMMs
(see `ExpertBank.forward`). Routers are not owned by the layer: a method hands
each layer the gate logits through `RoutingContext`, which lets per-task routers (moe-adapters)
and shared attribute-guided routers (mage) use the same layer. A per-sample mask in the context
turns the adapters off for chosen samples (they get the original CLIP output, bit for bit).

Frozen experts (`ExpertBank.freeze`) are read from a snapshot during later steps, so neither
their gradient (zero) nor the optimiser's weight decay can move them; `restore_frozen` writes the
snapshot back into the parameters before a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Below this many tokens per sample, CPU dispatch uses grouped GEMMs (see ExpertBank.forward).
GROUPED_MAX_TOKENS = 64


@dataclass
class RoutingContext:
    """What the layers of one forward pass share: the router callback and the gates they chose.

    `router(layer_index, cls_token)` returns gate logits [B, E] (noise already added in training);
    None means every sample uses expert 0 with weight 1. Gates are recorded per layer for
    load-balancing losses and usage statistics."""

    router: object = None
    top_k: int = 1
    gates: list = field(default_factory=list)  # per layer: (weights [B, k], indices [B, k], logits [B, E] | None)
    sample_mask: torch.Tensor | None = None  # [B]; 0 turns the adapters off for that sample
    condition: torch.Tensor | None = None  # [B, c]: what conditioned experts add to their hidden units


def noisy_logits(clean: torch.Tensor, noise_logits: torch.Tensor, training: bool) -> torch.Tensor:
    """Noisy top-k gating (Shazeer et al. 2017): h + eps * (softplus(c W_noise) + 0.01) in training,
    the clean logits otherwise (no noise at evaluation)."""
    if not training:
        return clean
    return clean + torch.randn_like(clean) * (F.softplus(noise_logits) + 0.01)


class ExpertBank(nn.Module):
    """E bottleneck adapters d -> r -> d with Down kaiming-initialised and Up zero-initialised.

    With `cond_dim` > 0 each expert also reads a per-sample condition c [B, cond_dim] (e.g. MAGE's
    attribute feature) into its hidden units: h = ReLU(x Down_e + b_e + c Cond_e), Cond_e
    zero-initialised, so a conditioned bank starts as an unconditioned one. Cond_e is a weight of
    expert e: it freezes with it."""

    def __init__(self, d: int, num_experts: int, rank: int = 64, scale: float = 0.1, dropout: float = 0.0,
                 cond_dim: int = 0):
        super().__init__()
        self.down = nn.Parameter(torch.empty(num_experts, d, rank))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, rank))
        self.up = nn.Parameter(torch.zeros(num_experts, rank, d))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, d))
        self.cond = nn.Parameter(torch.zeros(num_experts, cond_dim, rank)) if cond_dim else None
        for e in range(num_experts):  # kaiming on each expert's [r, d] weight, as nn.Linear would
            nn.init.kaiming_uniform_(self.down.data[e].T, a=math.sqrt(5))
        self.register_buffer("frozen", torch.zeros(num_experts, dtype=torch.bool))
        self._snapshot: tuple[torch.Tensor, ...] | None = None
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    @property
    def num_experts(self) -> int:
        return self.down.shape[0]

    # -- freezing -------------------------------------------------------------------------------
    def _params(self) -> tuple[torch.Tensor, ...]:
        return (self.down, self.down_bias, self.up, self.up_bias) + ((self.cond,) if self.cond is not None else ())

    def freeze(self, experts: torch.Tensor) -> None:
        """Freeze the experts of a bool mask [E] (added to those already frozen)."""
        self.restore_frozen()  # already frozen experts keep their snapshot values
        self.frozen |= experts.to(self.frozen.device)
        self.hold_frozen()

    @torch.no_grad()
    def hold_frozen(self) -> None:
        """Snapshot the frozen experts' current values; forward reads them from it from now on.
        Call it after loading a checkpoint (methods do it in `begin_step`)."""
        self._snapshot = tuple(p.detach().clone() for p in self._params()) if bool(self.frozen.any()) else None

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the snapshot back into the parameters (undoing weight decay on frozen experts)."""
        for p, value in zip(self._params(), self.tensors()):
            p.copy_(value)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(down, down_bias, up, up_bias[, cond]) as the forward uses them: frozen experts from the
        snapshot, so no gradient reaches them."""
        if self._snapshot is None:
            return self._params()
        m = self.frozen
        return tuple(torch.where(m.view(-1, *([1] * (p.dim() - 1))), s, p)
                     for s, p in zip(self._snapshot, self._params()))

    # -- dispatch -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, d]; weights, indices [B, k]: sum_k weights * expert_k(x), batched over samples;
        `condition` [B, cond_dim] for a conditioned bank (required there, ignored otherwise).

        Two batched strategies, both exact and free of host syncs, chosen by shape: on CPU with
        few tokens per sample (N < GROUPED_MAX_TOKENS) one grouped GEMM per projection over the
        (sample, slot) pairs sorted by expert; otherwise each sample gathers the weights of its k
        experts and runs them as one adapter of rank k*r with two bmm (the GPU path: grouped GEMMs
        there need bf16 on SM80+). Measured on CPU (benchmarks/bench_moe.py), grouped is ~2-3x
        faster at N <= 17 and ~2x slower at N = 197, where per-sample GEMMs are large enough."""
        tensors = self.tensors()
        w = (self.scale * weights).to(x.dtype)  # [B, k]: the scale folded into the gates
        shift = self._condition_shift(condition, tensors, x)  # [B, E, r] or None
        if self.num_experts == 1:  # dense adapter: no dispatch
            down, down_bias, up, up_bias = (t[0].to(x.dtype) for t in tensors[:4])
            pre = x @ down + down_bias
            h = self.dropout(F.relu(pre if shift is None else pre + shift[:, :1]))
            return w[:, :1, None] * (h @ up + up_bias)
        if x.device.type == "cpu" and x.shape[1] < GROUPED_MAX_TOKENS and not torch.compiler.is_compiling():
            return self._grouped(x, w, indices, tensors[:4], shift)  # (grouped_mm: no fp32 meta kernel to compile)
        return self._gathered(x, w, indices, tensors[:4], shift)

    def _condition_shift(self, condition, tensors, x) -> torch.Tensor | None:
        """c Cond_e for every sample and expert: [B, E, r] (cheap: B x E x r, whatever k is)."""
        if self.cond is None:
            return None
        if condition is None:
            raise ValueError("this expert bank is conditioned: the routing context must carry a condition")
        cond = tensors[4].to(x.dtype)  # [E, c, r]
        e, c, r = cond.shape
        return (condition.to(x.dtype) @ cond.permute(1, 0, 2).reshape(c, e * r)).view(-1, e, r)

    def _gathered(self, x, w, indices, tensors, shift=None):
        down, down_bias, up, up_bias = (t.to(x.dtype) for t in tensors)
        (b, k), (e, d, r) = indices.shape, down.shape
        dn = F.embedding(indices, down.view(e, d * r)).view(b, k, d, r).permute(0, 2, 1, 3).reshape(b, d, k * r)
        bias = F.embedding(indices, down_bias)  # [B, k, r]
        if shift is not None:
            bias = bias + shift.gather(1, indices[:, :, None].expand(-1, -1, r))
        h = torch.baddbmm(bias.view(b, 1, k * r), x, dn)
        h = self.dropout(F.relu(h))
        h = (h.view(b, -1, k, r) * w[:, None, :, None]).view(b, -1, k * r)
        bias = (w[:, :, None] * F.embedding(indices, up_bias)).sum(1)[:, None, :]  # [B, 1, d]
        return torch.baddbmm(bias, h, F.embedding(indices, up.view(e, r * d)).view(b, k * r, d))

    def _grouped(self, x, w, indices, tensors, shift=None):
        down, down_bias, up, up_bias = (t.to(x.dtype) for t in tensors)
        (b, k), (e, d, r), n = indices.shape, down.shape, x.shape[1]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # (sample, slot) pairs, grouped by expert
        experts, samples = flat[order], order // k
        counts = torch.zeros(e, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = (counts.cumsum(0) * n).to(torch.int32)  # token offsets per expert
        bias = down_bias[experts] if shift is None else down_bias[experts] + shift[samples, experts]
        h = F.grouped_mm(x[samples].reshape(-1, d), down, offs=offs).view(-1, n, r) + bias[:, None, :]
        gate = w.reshape(-1)[order]
        h = self.dropout(F.relu(h)) * gate[:, None, None]
        y = F.grouped_mm(h.reshape(-1, r), up, offs=offs).view(-1, n, d)
        y = y + (gate[:, None] * up_bias[experts])[:, None, :]
        return torch.zeros_like(x).index_add(0, samples, y)


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

    # open_clip's text transformer asks its first block for the cast dtype: through
    # `get_weight_dtype()` (3.x) or `mlp.c_fc.weight` (2.x)
    def get_weight_dtype(self) -> torch.dtype:
        return self.block.get_weight_dtype() if hasattr(self.block, "get_weight_dtype") else \
            self.block.mlp.c_fc.weight.dtype

    @property
    def mlp(self) -> nn.Module:
        return self.block.mlp

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        b = self.block
        if not self.enabled or self.context is None:
            return b(q_x, k_x, v_x, attn_mask=attn_mask)
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), attn_mask=attn_mask))
        cls = x[:, 0] if self.batch_first else x[0]
        weights, indices = self._gates(cls)
        xb = x if self.batch_first else x.transpose(0, 1)
        delta = self.experts(xb, weights, indices, self.context.condition)
        if not self.batch_first:
            delta = delta.transpose(0, 1)
        return x + b.ls_2(b.mlp(b.ln_2(x))) + delta.to(x.dtype)

    def _gates(self, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.context
        if ctx.router is None:
            ones = torch.ones(cls.shape[0], 1, device=cls.device, dtype=torch.float32)
            if ctx.sample_mask is not None:
                ones = ones * ctx.sample_mask.to(ones.dtype)[:, None]
            zeros = torch.zeros(cls.shape[0], 1, device=cls.device, dtype=torch.long)
            ctx.gates.append((ones, zeros, None))
            return ones, zeros
        logits = ctx.router(self.layer_index, cls).float()  # [B, E]
        top, indices = logits.topk(ctx.top_k, dim=-1)
        weights = top.softmax(dim=-1)
        if ctx.sample_mask is not None:
            weights = weights * ctx.sample_mask.to(weights.dtype)[:, None]
        ctx.gates.append((weights, indices, logits))
        return weights, indices


TOWERS = ("image", "text")


def tower_transformer(clip_model: nn.Module, tower: str) -> nn.Module | None:
    """The open_clip transformer of a CLIP tower (its blocks are what adapters replace), or None when
    the tower is not one (a timm or ResNet image tower, a Hugging Face text tower such as
    uniil-micro's MiniLM)."""
    from open_clip.transformer import Transformer

    if tower == "image":
        found = getattr(getattr(clip_model, "visual", None), "transformer", None)
    elif isinstance(getattr(clip_model, "transformer", None), Transformer):  # CLIP: the text tower's blocks
        found = clip_model.transformer
    else:  # CustomTextCLIP with open_clip's TextTransformer
        found = getattr(getattr(clip_model, "text", None), "transformer", None)
    return found if isinstance(found, Transformer) else None


class Adapters(nn.Module):
    """Expert banks in the chosen blocks of one CLIP tower (`tower`: "image" or "text"), inserted by
    module replacement. In the text tower a block routes on the first token (start of text), as
    the original MoE-Adapters does: under the causal mask it sees only itself, so every prompt of a
    batch is routed alike."""

    def __init__(self, clip_model: nn.Module, num_experts: int = 1, rank: int = 64, scale: float = 0.1,
                 dropout: float = 0.0, layers: list[int] | None = None, tower: str = "image", cond_dim: int = 0):
        super().__init__()
        transformer = tower_transformer(clip_model, tower)
        if transformer is None:
            raise ValueError(f"the {tower} tower of {type(clip_model).__name__} is not an open_clip transformer")
        blocks = transformer.resblocks
        chosen = list(range(len(blocks))) if layers is None else layers
        width = transformer.width
        self.banks = nn.ModuleList()
        self._blocks: list[AdaptedBlock] = []
        for i in chosen:
            if isinstance(blocks[i], AdaptedBlock):
                raise ValueError(f"block {i} already carries adapters")
            bank = ExpertBank(width, num_experts, rank, scale, dropout, cond_dim)
            adapted = AdaptedBlock(blocks[i], bank, len(self._blocks), transformer.batch_first)
            blocks[i] = adapted
            self.banks.append(bank)
            self._blocks.append(adapted)
        self.num_experts, self.width, self.tower = num_experts, width, tower

    @property
    def num_layers(self) -> int:
        return len(self.banks)

    def routing(self, ctx: RoutingContext | None):
        """Context manager: the layers route with `ctx` inside it; None turns the adapters off."""
        return _Routing(self._blocks, ctx)

    def freeze(self, experts: torch.Tensor) -> None:
        """Freeze experts per layer: bool mask [L, E]."""
        for bank, mask in zip(self.banks, experts):
            bank.freeze(mask)

    def hold_frozen(self) -> None:
        for bank in self.banks:
            bank.hold_frozen()

    def restore_frozen(self) -> None:
        for bank in self.banks:
            bank.restore_frozen()

    def frozen(self) -> torch.Tensor:
        """[L, E] bool: which experts of each layer are frozen."""
        return torch.stack([bank.frozen for bank in self.banks])

    def frozen_experts(self) -> list[list[int]]:
        """The frozen experts of each layer, as indices (for records)."""
        return [[e for e, f in enumerate(row) if f] for row in self.frozen().tolist()]


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

    importance = summed gate weights per expert (differentiable); load = samples routed per expert,
    counted, so only the importance term carries a gradient. (Shazeer's smooth estimate of load,
    P(expert in top-k) under the gate noise, which the original MoE-Adapters code uses in
    training, is not implemented.)"""
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


def expert_usage(gates: list, num_experts: int) -> torch.Tensor:
    """[L, E]: how many samples each layer routed to each expert (masked-off samples not counted)."""
    rows = []
    for weights, indices, _ in gates:
        counted = (weights > 0).to(torch.float32).reshape(-1)
        rows.append(torch.zeros(num_experts, device=indices.device).index_add_(0, indices.reshape(-1), counted))
    return torch.stack(rows)


def _cv2(v: torch.Tensor) -> torch.Tensor:
    return v.float().var(unbiased=False) / (v.float().mean() ** 2 + 1e-10)
