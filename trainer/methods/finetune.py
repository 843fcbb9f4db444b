"""`finetune`: the lower bound. One adapter per image-tower block (an MoE layer with E = 1),
trained on each step in turn with no protection against forgetting."""

from __future__ import annotations

import torch

from ..adapters import Adapters, RoutingContext
from .base import Batch, ContinualMethod, option, register_method


@register_method("finetune")
class Finetune(ContinualMethod):
    option_keys = frozenset({"adapter_rank", "adapter_scale", "label_smoothing"})
    def __init__(self, clip, text, options):
        super().__init__(clip, text, options)
        self.adapters = Adapters(clip.model, num_experts=1, rank=option(options, "adapter_rank", 64),
                                 scale=option(options, "adapter_scale", 0.1))

    def encode(self, batch: Batch) -> torch.Tensor:
        with self.adapters.routing(RoutingContext()):
            feats = self.clip.model.encode_image(batch.images)
        return torch.nn.functional.normalize(feats.float(), dim=-1)
