"""`finetune`: the lower bound. One adapter per image-tower block (an MoE layer with E = 1),
trained on each step in turn with no protection against forgetting."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import Adapters, RoutingContext
from .base import Batch, ContinualMethod, StepData, label_smoothing_option, train_vocab_option, opt, register_method


@register_method("finetune")
class Finetune(ContinualMethod):
    """One adapter per image-tower block, trained on every step in turn: the lower bound."""

    @dataclass(frozen=True)
    class Options(ContinualMethod.Options):
        adapter_rank: int = opt(64, "bottleneck width r of each adapter", minimum=1)
        adapter_scale: float = opt(0.1, "scale s of the adapter output added to the block's")
        label_smoothing: float = label_smoothing_option()
        train_vocab: str = train_vocab_option()

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        self.adapters = Adapters(clip.model, num_experts=1, rank=self.opts.adapter_rank, scale=self.opts.adapter_scale)

    def forward(self, batch: Batch, data: StepData) -> torch.Tensor:
        return self.classification_loss(self.encode(batch), batch, data, self.opts.label_smoothing)

    def encode(self, batch: Batch) -> torch.Tensor:
        with self.adapters.routing(RoutingContext()):
            feats = self.clip.model.encode_image(batch.images)
        return torch.nn.functional.normalize(feats.float(), dim=-1)
