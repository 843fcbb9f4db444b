"""Training `uniil-micro` LiT-style on rendered images and captions from the renderer's ground truth.

Pre-training holds something out, as web pre-training does: images of the held-in domains (photo,
clipart) come with captions naming shape, colour, texture, size and domain; images of the other
domains are rarer and captioned with their style only ("a sketch", "sketch style"), the way web
data knows what a sketch looks like without labelling every sketched object. So zero-shot
recognition is good on held-in domains and clearly imperfect elsewhere, and domain steps in the
continual scenarios are real shifts.

A caption is often true of several images in a batch ("a red star"), so the contrastive targets
are soft: each image's target spreads over every caption in the batch that is true of it.
The text tower is locked, so MiniLM embeds every possible caption once, before training.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..common import atomic_path
from ..data.synthetic import COLOURS, DOMAINS, SIZES, TEXTURES, SyntheticConfig, class_names, render
from . import micro

log = logging.getLogger(__name__)

HELD_IN = ("photo", "clipart")
DOMAIN_WORDS = {"photo": "photo", "clipart": "clipart", "sketch": "sketch", "painting": "painting",
                "inverted": "inverted photo"}
FIELDS = ("shape", "colour", "texture", "size", "domain")
# (template, fields it names); {domain} reads as a noun ("sketch", "inverted photo").
TEMPLATES = (
    ("a {domain} of a {shape}.", ("shape", "domain")),
    ("a {shape}.", ("shape",)),
    ("a {colour} {shape}.", ("colour", "shape")),
    ("a {texture} {shape}.", ("texture", "shape")),
    ("a {size} {shape}.", ("size", "shape")),
    ("a {size} {colour} {shape}.", ("size", "colour", "shape")),
    ("a {domain} of a {colour} {shape}.", ("domain", "colour", "shape")),
    ("{colour} colour", ("colour",)),
    ("{texture} texture", ("texture",)),
    ("{size} size", ("size",)),
    ("{domain} style", ("domain",)),
    ("a {domain}.", ("domain",)),
)


@dataclass(frozen=True)
class Recipe:
    images: int = 20_000  # rendered once, reused every epoch
    held_out_fraction: float = 0.15
    held_in_weights: tuple[float, float] = (0.65, 0.35)  # photo, clipart
    epochs: int = 14
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0


def _values() -> dict[str, tuple[str, ...]]:
    return {"shape": tuple(class_names()), "colour": tuple(COLOURS), "texture": TEXTURES, "size": tuple(SIZES),
            "domain": DOMAINS}


def caption_table() -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Every caption of every template: texts, their attribute codes [M, 5] (-1 = not named), and per
    template the caption index for each combination of its fields (row-major over value lists)."""
    values = _values()
    texts, codes, lookup = [], [], []
    for template, fields in TEMPLATES:
        ranges = [range(len(values[f])) for f in fields]
        first = len(texts)
        for combo in itertools.product(*ranges):
            words = {f: values[f][i] for f, i in zip(fields, combo)}
            if "domain" in words:
                words["domain"] = DOMAIN_WORDS[words["domain"]]
            texts.append(template.format(**words))
            code = [-1] * len(FIELDS)
            for f, i in zip(fields, combo):
                code[FIELDS.index(f)] = i
            codes.append(code)
        lookup.append(np.arange(first, len(texts)).reshape([len(r) for r in ranges]))
    return texts, np.asarray(codes, np.int64), lookup


def render_pretraining_set(recipe: Recipe, size: int, progress=None) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed images [N, 3, size, size] and their truth codes [N, 5], seeded."""
    values = _values()
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


def _applicable(truth_row: np.ndarray) -> list[int]:
    """Templates that may caption an image. Those naming the shape are listed three times: the
    class is what the image is of, and colour alone is learnt far faster than shape."""
    held_in = DOMAINS[truth_row[4]] in HELD_IN
    out = []
    for t, (_, fields) in enumerate(TEMPLATES):
        if held_in or set(fields) <= {"domain"}:
            out += [t] * (3 if "shape" in fields else 1)
    return out


@torch.no_grad()
def embed_captions(model, texts: list[str]) -> torch.Tensor:
    """MiniLM's pooled (pre-projection) output for every caption; the projection trains on top."""
    hf = micro.tokenizer().tokenizer  # padded to each batch's longest caption, not to the context length:
    out = []                           # masked mean pooling makes the result the same, 3x faster
    for i in range(0, len(texts), 256):
        enc = hf(texts[i:i + 256], padding=True, return_tensors="pt")
        hidden = model.text.transformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out.append(model.text.pooler(hidden, enc["attention_mask"]))
    return torch.cat(out)


def soft_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, truth: torch.Tensor):
    """CLIP's symmetric loss with targets spread over every (image, caption) pair that is true."""
    logits = scale * img @ txt.T
    t = truth.float()
    loss_i = -(t / t.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(t / t.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (loss_i + loss_t) / 2


def train(recipe: Recipe = Recipe(), progress=None) -> torch.nn.Module:
    cfg = micro.MicroConfig()
    torch.manual_seed(recipe.seed)
    model = micro.build_model(cfg)
    texts, codes, lookup = caption_table()
    started = time.perf_counter()
    pooled = embed_captions(model, texts)
    images, truth = render_pretraining_set(recipe, cfg.image_size, progress)
    log.info("captions %d, images %d, set-up %.1f s", len(texts), len(images), time.perf_counter() - started)
    rng = np.random.default_rng(recipe.seed)
    codes_t = torch.from_numpy(codes)
    truth_t = torch.from_numpy(truth)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(images) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / recipe.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(i, total) / total)))
    applicable = [_applicable(row) for row in truth]
    gen = torch.Generator().manual_seed(recipe.seed)
    if progress:
        progress.start("micro", "training uniil-micro (LiT, text locked)", total)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(images), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            caps = []
            for i in idx.tolist():
                t = applicable[i][int(rng.integers(len(applicable[i])))]
                fields = TEMPLATES[t][1]
                caps.append(int(lookup[t][tuple(truth[i, FIELDS.index(f)] for f in fields)]))
            caps_t = torch.tensor(caps)
            c = codes_t[caps_t]  # [B, 5]
            true = ((c[None, :, :] == -1) | (c[None, :, :] == truth_t[idx][:, None, :])).all(-1)  # [B, B]
            img = F.normalize(model.encode_image(images[idx]), dim=-1)
            txt = F.normalize(model.text.proj(pooled[caps_t]), dim=-1)
            loss = soft_contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100), true)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress.advance("micro", 1)
    if progress:
        progress.stop("micro")
    log.info("uniil-micro trained in %.1f s (last loss %.3f)", time.perf_counter() - started, loss.item())
    return model.eval()


def train_and_cache(recipe: Recipe = Recipe(), progress=None):
    """Train and store the weights atomically; returns the cache path."""
    from safetensors.torch import save_file

    path = micro.weights_path()
    model = train(recipe, progress)
    with atomic_path(path) as tmp:
        save_file(micro.trained_state(model), str(tmp), metadata={"recipe": repr(recipe), "version": str(micro.VERSION)})
    return path
