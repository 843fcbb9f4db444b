"""`zeroshot` (Continual-CLIP): no training; logits = 100 * f(x) . t_c over the evaluated vocabulary.

Option `prototypes` picks the class embeddings t_c (the last two need `--pool`):
  class_names   the text embedding of "a photo of a {c}." (default; Continual-CLIP)
  descriptions  classification by description: the mean embedding of c's attributes in the pool
  enriched      normalise(t_c + beta * mean attribute embedding), option `beta` (default 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Batch, ContinualMethod, opt, register_method

PROTOTYPES = ("class_names", "descriptions", "enriched")


@register_method("zeroshot")
class ZeroShot(ContinualMethod):
    """Continual-CLIP: frozen CLIP, 100 * f(x) . t_c over the evaluated vocabulary; no training."""

    @dataclass(frozen=True)
    class Options(ContinualMethod.Options):
        prototypes: str = opt("class_names", "class embeddings: class-name text, attribute means (descriptions) "
                              "or both (enriched); the last two need --pool", choices=PROTOTYPES)
        beta: float = opt(1.0, "weight of the attribute mean in enriched prototypes")

    trains = False
    uses_frozen_features = True  # evaluation reads cached frozen CLIP features

    @classmethod
    def requires_pool(cls, opts) -> bool:
        return opts.prototypes != "class_names"

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        kind = self.opts.prototypes
        if kind != "class_names":
            from ...attrpool.zeroshot import class_attribute_means, enriched_prototypes

            means = class_attribute_means(self.context.pool, list(self.context.class_names))
            protos = means if kind == "descriptions" else enriched_prototypes(text.cpu().numpy(), means, self.opts.beta)
            protos = torch.nn.functional.normalize(torch.from_numpy(protos).float(), dim=-1)
            self.text = protos.to(text.device)

    def encode(self, batch: Batch) -> torch.Tensor:
        if batch.features is not None:
            return batch.features
        return torch.nn.functional.normalize(self.clip.model.encode_image(batch.images).float(), dim=-1)
