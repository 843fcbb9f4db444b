"""`zeroshot` (Continual-CLIP): no training; logits = 100 * f(x) . t_c over the evaluated vocabulary.

Option `prototypes` picks the class embeddings t_c (the last two need `--pool`):
  class_names   the text embedding of "a photo of a {c}." (default; Continual-CLIP)
  descriptions  classification by description: the mean embedding of c's attributes in the pool
  enriched      normalise(t_c + beta * mean attribute embedding), option `beta` (default 1)
"""

from __future__ import annotations

import torch

from ...errors import UserError
from .base import Batch, ContinualMethod, option, register_method

PROTOTYPES = ("class_names", "descriptions", "enriched")


@register_method("zeroshot")
class ZeroShot(ContinualMethod):
    option_keys = frozenset({"prototypes", "beta"})
    trains = False
    uses_frozen_features = True  # evaluation reads cached frozen CLIP features

    def __init__(self, clip, text, options):
        super().__init__(clip, text, options)
        kind = option(options, "prototypes", "class_names", choices=PROTOTYPES)
        if kind != "class_names":
            from ...attrpool.zeroshot import class_attribute_means, enriched_prototypes

            if options.get("pool") is None:
                raise UserError(f"zeroshot with prototypes={kind} needs an attribute pool: pass --pool P.duckdb")
            means = class_attribute_means(options["pool"], list(options["class_names"]))
            protos = means if kind == "descriptions" else \
                enriched_prototypes(text.cpu().numpy(), means, option(options, "beta", 1.0))
            protos = torch.nn.functional.normalize(torch.from_numpy(protos).float(), dim=-1)
            self.text = protos.to(text.device)

    def encode(self, batch: Batch) -> torch.Tensor:
        if batch.features is not None:
            return batch.features
        return torch.nn.functional.normalize(self.clip.model.encode_image(batch.images).float(), dim=-1)
