"""`zeroshot` (Continual-CLIP): no training; logits = 100 * f(x) . t_c over the evaluated vocabulary."""

from __future__ import annotations

import torch

from .base import Batch, ContinualMethod, register_method


@register_method("zeroshot")
class ZeroShot(ContinualMethod):
    trains = False
    uses_frozen_features = True  # evaluation reads cached frozen CLIP features

    def encode(self, batch: Batch) -> torch.Tensor:
        if batch.features is not None:
            return batch.features
        return torch.nn.functional.normalize(self.clip.model.encode_image(batch.images).float(), dim=-1)
