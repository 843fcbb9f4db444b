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
possible caption once, before training; only the projection trains on the text side. v4 keeps v3's
captions, losses and compute (320,000 image passes) and changes the optimisation: lr 1e-3 instead
of 4e-3 (at 4e-3 shapes were learnt about three times slower) and twice the images for half the
epochs (more distinct images beat more passes over fewer).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..common import atomic_path, usable_cpus
from ..data.synthetic import DOMAINS, SyntheticConfig, render
from . import micro
from .micro_captions import FIELDS, HELD_IN, field_values, caption_world, sample_caption

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    images: int = 40_000  # rendered once, reused every epoch
    held_out_fraction: float = 0.15
    held_in_weights: tuple[float, float] = (0.65, 0.35)  # photo, clipart
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3  # v3's 4e-3 learnt shapes about 3x slower (benchmarks/RESULTS.md)
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0
    # bank (v3): the in-batch loss, plus for held-in images the class against the 24 zero-shot prompts and
    # the image against every shape fact's wording; batch (v2): the in-batch loss alone
    loss: str = "bank"
    # each image in one of the 8 flips and quarter turns, drawn afresh every step: label-preserving (the
    # renderer rotates every shape at random, and a mirrored shape is still that shape) and nearly free
    dihedral: bool = False


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


def dihedral(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image flipped or not and turned by a random multiple of 90 degrees."""
    which = torch.randint(0, 8, (len(images),), generator=gen)
    out = torch.empty_like(images)
    for t in range(8):
        sel = which == t
        if sel.any():
            x = images[sel].flip(-1) if t >= 4 else images[sel]
            out[sel] = torch.rot90(x, t % 4, dims=(-2, -1))
    return out


def _draw_codes(recipe: Recipe) -> np.ndarray:
    """The truth codes [N, 5] of the pre-training images, drawn in order from the recipe's seed."""
    values = field_values()
    rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, 3]))
    held_out = [d for d in DOMAINS if d not in HELD_IN]
    truth = np.empty((recipe.images, len(FIELDS)), np.int64)
    for k in range(recipe.images):
        # photos are the harder held-in domain (lighting, noise, gradients): they get more of the images
        domain = str(rng.choice(held_out)) if rng.random() < recipe.held_out_fraction else \
            str(rng.choice(HELD_IN, p=recipe.held_in_weights))
        truth[k] = [int(rng.integers(len(values[f]))) for f in FIELDS[:4]] + [DOMAINS.index(domain)]
    return truth


def _render_range(images: torch.Tensor, truth: np.ndarray, seed: int, ks: range, progress=None, share: int = 1) -> None:
    values, transform, config = field_values(), micro.preprocess(), SyntheticConfig()
    for n, k in enumerate(ks, 1):
        code = truth[k]
        img_rng = np.random.default_rng(np.random.SeedSequence([seed, 3, k]))  # each image its own seed
        img, _ = render(*(values[f][i] for f, i in zip(FIELDS[:4], code[:4])), DOMAINS[code[4]], img_rng, config)
        images[k] = transform(img)
        if progress and n % 500 == 0:
            progress.advance("render", 500 * share)  # the other processes render as many meanwhile


def _render_child(images, truth, seed, ks) -> None:
    torch.set_num_threads(1)
    _render_range(images, truth, seed, ks)


def render_pretraining_set(recipe: Recipe, size: int, progress=None, workers: int | None = None
                           ) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed images [N, 3, size, size] and their truth codes [N, 5], seeded: the same tensors
    whatever the number of processes, which split the images (one process renders ~530 a second on
    a core of the AMD EPYC that measured it)."""
    import multiprocessing

    truth = _draw_codes(recipe)
    images = torch.empty(recipe.images, 3, size, size)
    workers = min(workers or usable_cpus(), 4)
    if "fork" not in multiprocessing.get_all_start_methods() or recipe.images < 64 * workers:
        workers = 1  # the children write into a shared tensor, which needs fork; few images: a fork costs more
    if progress:
        progress.start("render", "rendering uniil-micro's pre-training images", recipe.images)
    chunks = [range(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(recipe.images), workers)]
    procs = []
    if workers > 1:
        images.share_memory_()
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_render_child, args=(images, truth, recipe.seed, ks)) for ks in chunks[1:]]
        for proc in procs:
            proc.start()
    try:
        _render_range(images, truth, recipe.seed, chunks[0], progress, share=workers)
    finally:
        for proc in procs:
            proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError("a process rendering uniil-micro's pre-training images failed")
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
            batch = dihedral(images[idx], gen) if recipe.dihedral else images[idx]
            img = F.normalize(model.encode_image(batch), dim=-1)
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
