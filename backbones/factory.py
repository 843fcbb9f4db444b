"""Loading CLIP backbones by name: open_clip models (pretrained tag, checkpoint path or random) and
the built-in offline configs in model_configs/, created from a fixed seed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .. import torchvision_fix  # noqa: F401  (must precede open_clip)
from ..errors import UserError
from .spec import BUILTIN_SEED, CONFIG_DIR, BackboneSpec

import open_clip  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)

_registered = False


def _register_builtin_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class Backbone:
    spec: BackboneSpec
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    dim: int
    device: torch.device

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings, float32, one row per text."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            feats = self.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


    @torch.inference_mode()
    def encode_images(self, images: list, batch_size: int = 64) -> np.ndarray:
        """L2-normalised image embeddings of PIL images, float32, one row per image."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(img) for img in images[i:i + batch_size]]).to(self.device)
            feats = self.model.encode_image(batch).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def ensure_trained(spec: BackboneSpec, progress=None) -> None:
    """Train a trained built-in backbone now where neither shipped nor cached weights exist (a checkout
    without the package's weights files: once per machine)."""
    if spec.model == "uniil-micro":
        from . import micro

        if not micro.weights_path(spec).exists():
            from .micro_train import train_and_cache

            log.warning("training uniil-micro once (a few minutes on CPU); later uses load it from %s",
                        spec.cached_weights())
            train_and_cache(progress=progress)


def load_backbone(spec: BackboneSpec, device: str = "cpu", progress=None) -> Backbone:
    if spec.model == "uniil-micro":
        from . import micro

        ensure_trained(spec, progress)
        model = micro.load_model(device, spec)
        for p in model.parameters():
            p.requires_grad_(False)
        return Backbone(spec, model, micro.preprocess(), micro.tokenizer(), micro.MicroConfig().embed_dim,
                        torch.device(device))
    _register_builtin_configs()
    if spec.model not in open_clip.list_models():
        some = ", ".join(open_clip.list_models()[:6])
        raise UserError(f"unknown CLIP model '{spec.model}'; use an open_clip name (e.g. ViT-B-16; "
                        f"`python -c 'import open_clip; print(open_clip.list_models())'` lists them: {some}, ...) "
                        "or a built-in offline one: uniil-micro (trained on the synthetic world), uniil-tiny (random)")
    pretrained = None if spec.is_builtin or spec.pretrained == "none" else spec.pretrained
    # open_clip logs "initialized randomly" (here the intent) and download errors (we report them as
    # one line below) on the root logger.
    logging.disable(logging.WARNING if pretrained is None else logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained,
                                                                          device=device)
    except Exception as exc:  # open_clip raises many kinds: network, hub, unknown tag
        if pretrained is None:
            raise
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = "download failed" if "download" in text.lower() else text[:100].rstrip() + ("..." if len(text) > 100 else "")
        raise UserError(f"cannot load weights '{pretrained}' for {spec.model} ({reason}); pretrained tags are "
                        "downloaded once and need network access. Offline: pass --clip-pretrained "
                        "/path/to/checkpoint.pt, or --clip-pretrained none (random weights), "
                        "or --clip-model uniil-micro / uniil-tiny (built in, offline)") from None
    finally:
        logging.disable(logging.NOTSET)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(spec.model)
    dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
        else int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return Backbone(spec, model, preprocess, tokenizer, dim, torch.device(device))
