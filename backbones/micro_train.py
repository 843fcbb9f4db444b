"""Training `uniil-micro` LiT-style on rendered images and captions from the renderer's ground truth.

Pre-training holds something out, as web pre-training does: images of the held-in domains (photo,
clipart) come with captions naming shape, colour, texture, size and domain, or stating a fact of
the shape or the style (micro_captions.py); images of the other domains are rarer and captioned
with their style only ("a sketch", "pencil strokes"), the way web data knows what a sketch looks
like without labelling every sketched object. So zero-shot
recognition is good on held-in domains and clearly imperfect elsewhere, and domain steps in the
continual scenarios are real shifts.

A caption is often true of several images in a batch ("a red star", "6 sides"), so the contrastive
targets are soft: each image's target spreads over every caption in the batch that is true of it.
The in-batch loss alone (v2) learns shapes slowly; v3 adds, for held-in images, two losses against
fixed caption banks: the class against the 24 zero-shot prompts of the image's domain, and the image
against every shape fact's wording, spread over the facts true of it (weighted double: they are
what classification by description needs). The text tower is locked, so MiniLM embeds every
possible caption once, before training; only the projection trains on the text side.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..common import atomic_path
from ..data.synthetic import DOMAINS, SyntheticConfig, render
from . import micro
from .micro_captions import FIELDS, HELD_IN, field_values, caption_world, sample_caption

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    images: int = 20_000  # rendered once, reused every epoch
    held_out_fraction: float = 0.15
    held_in_weights: tuple[float, float] = (0.65, 0.35)  # photo, clipart
    epochs: int = 16
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0
    # bank (v3): the in-batch loss, plus for held-in images the class against the 24 zero-shot prompts and
    # the image against every shape fact's wording; batch (v2): the in-batch loss alone
    loss: str = "bank"


def bank_losses(img: torch.Tensor, proj, pooled: torch.Tensor, scale: torch.Tensor, world, codes: np.ndarray,
                name_banks: np.ndarray, colour_bank: np.ndarray) -> torch.Tensor:
    """For held-in images: cross-entropy of the class against the 24 zero-shot prompts of its domain,
    of the colour against the 12 colour phrases (so that shape does not crowd colour out of the
    embedding), and a soft cross-entropy over every shape fact's wording, spread over the facts
    true of it."""
    held_in = torch.from_numpy(np.isin(codes[:, 4], [DOMAINS.index(d) for d in HELD_IN]))
    if not held_in.any():
        return img.sum() * 0
    img, codes = img[held_in], codes[held_in.numpy()]
    names = F.normalize(proj(pooled[torch.from_numpy(name_banks[codes[:, 4]])]), dim=-1)  # [B, S, D]
    name_loss = F.cross_entropy(scale * torch.einsum("bd,bsd->bs", img, names), torch.from_numpy(codes[:, 0]))
    facts = F.normalize(proj(pooled[torch.from_numpy(world.fact_bank)]), dim=-1)  # [F, D]
    t = torch.from_numpy(world.shape_mask[world.fact_bank][:, codes[:, 0]].T).float()  # [B, F]
    fact_loss = -(t / t.sum(1, keepdim=True) * F.log_softmax(scale * img @ facts.T, dim=1)).sum(1).mean()
    colours = F.normalize(proj(pooled[torch.from_numpy(colour_bank)]), dim=-1)  # [12, D]
    colour_loss = F.cross_entropy(scale * img @ colours.T, torch.from_numpy(codes[:, 1]))
    return name_loss + colour_loss + 2 * fact_loss  # facts weigh double: classification by description needs them


def render_pretraining_set(recipe: Recipe, size: int, progress=None) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed images [N, 3, size, size] and their truth codes [N, 5], seeded."""
    values = field_values()
    rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, 3]))
    transform = micro.preprocess()
    config = SyntheticConfig()
    held_out = [d for d in DOMAINS if d not in HELD_IN]
    images = torch.empty(recipe.images, 3, size, size)
    truth = np.empty((recipe.images, len(FIELDS)), np.int64)
    if progress:
        progress.start("render", "rendering uniil-micro's pre-training images", recipe.images)
    for k in range(recipe.images):
        # photos are the harder held-in domain (lighting, noise, gradients): they get more of the images
        domain = str(rng.choice(held_out)) if rng.random() < recipe.held_out_fraction else \
            str(rng.choice(HELD_IN, p=recipe.held_in_weights))
        code = [int(rng.integers(len(values[f]))) for f in FIELDS[:4]] + [DOMAINS.index(domain)]
        img_rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, 3, k]))
        img, _ = render(*(values[f][i] for f, i in zip(FIELDS[:4], code[:4])), domain, img_rng, config)
        images[k] = transform(img)
        truth[k] = code
        if progress and k % 500 == 499:
            progress.advance("render", 500)
    if progress:
        progress.stop("render")
    return images, truth


# The text tower is locked (MiniLM as shipped), so its pooled output for a caption list never
# changes: computed once per process (6,404 captions: ~20 s on a slow 2-core machine).
_pooled_cache: dict[tuple, torch.Tensor] = {}  # (text tower weights' sum, captions...)


@torch.no_grad()
def embed_captions(model, texts: list[str]) -> torch.Tensor:
    """MiniLM's pooled (pre-projection) output for every caption; the projection trains on top."""
    key = (float(sum(p.double().sum() for p in model.text.transformer.parameters())),) + tuple(texts)
    if key not in _pooled_cache:
        hf = micro.tokenizer().tokenizer  # padded to each batch's longest caption, not to the context
        out = []                           # length: masked mean pooling makes the result the same, 3x faster
        for i in range(0, len(texts), 256):
            enc = hf(texts[i:i + 256], padding=True, return_tensors="pt")
            hidden = model.text.transformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(model.text.pooler(hidden, enc["attention_mask"]))
        _pooled_cache.clear()  # one list at a time: a different caption world replaces it
        _pooled_cache[key] = torch.cat(out)
    return _pooled_cache[key].clone()


def soft_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, truth: torch.Tensor):
    """CLIP's symmetric loss with targets spread over every (image, caption) pair that is true."""
    logits = scale * img @ txt.T
    t = truth.float()
    loss_i = -(t / t.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(t / t.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (loss_i + loss_t) / 2


def train(recipe: Recipe = Recipe(), progress=None, on_epoch=None) -> torch.nn.Module:
    """The trained model (eval mode); `on_epoch(epoch, model)` is called after each epoch."""
    cfg = micro.MicroConfig()
    torch.manual_seed(recipe.seed)
    model = micro.build_model(cfg)
    world = caption_world()
    started = time.perf_counter()
    pooled = embed_captions(model, world.texts)
    images, truth = render_pretraining_set(recipe, cfg.image_size, progress)
    images = images.contiguous(memory_format=torch.channels_last)  # the conv stem's faster layout
    model.visual.conv1.to(memory_format=torch.channels_last)
    log.info("captions %d, images %d, set-up %.1f s", len(world.texts), len(images), time.perf_counter() - started)
    rng = np.random.default_rng(recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(images) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / recipe.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(i, total) / total)))
    gen = torch.Generator().manual_seed(recipe.seed)
    name_banks, colour_bank = world.name_banks(), world.colour_bank()
    if progress:
        progress.start("micro", "training uniil-micro (LiT, text locked)", total)
    model.train()
    for epoch in range(recipe.epochs):
        perm = torch.randperm(len(images), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            caps = np.asarray([sample_caption(world, truth[i], rng) for i in idx.tolist()])
            true = torch.from_numpy(world.truth(caps, truth[idx.numpy()]))
            img = F.normalize(model.encode_image(images[idx]), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            txt = F.normalize(model.text.proj(pooled[torch.from_numpy(caps)]), dim=-1)
            loss = soft_contrastive_loss(img, txt, scale, true)
            if recipe.loss == "bank":
                loss = (loss + bank_losses(img, model.text.proj, pooled, scale, world, truth[idx.numpy()],
                                           name_banks, colour_bank)) / 5
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress.advance("micro", 1)
        if on_epoch:
            model.eval()
            on_epoch(epoch, model)
            model.train()
    if progress:
        progress.stop("micro")
    log.info("uniil-micro trained in %.1f s (last loss %.3f)", time.perf_counter() - started, loss.item())
    model.visual.conv1.to(memory_format=torch.contiguous_format)
    return model.eval()


def train_and_cache(recipe: Recipe = Recipe(), progress=None):
    """Train and store the weights atomically; returns the cache path."""
    from safetensors.torch import save_file

    from .spec import BackboneSpec

    path = BackboneSpec(micro.NAME, None).cached_weights()
    model = train(recipe, progress)
    with atomic_path(path) as tmp:
        save_file(micro.trained_state(model), str(tmp), metadata={"recipe": repr(recipe), "version": str(micro.VERSION)})
    return path
