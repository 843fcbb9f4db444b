"""One run of the search for a uniil-micro recipe that trains within 5 minutes (issue 14;
benchmarks/RESULTS.md, "uniil-micro v4"): trains with a Recipe override and one change patched in,
evaluates photo zero-shot every 4 epochs and all domains at the end, and prints the wall time.

    .venv/bin/python benchmarks/micro_recipe_search.py '{"images": 20000, "epochs": 6, "batch_size": 64}' \
        [--change none|clean40|whiten|separable|relu]

The changes are experiments, not options of the shipped recipe, so they are patched in here:
  clean40    40% of the pre-training images drawn without distractors and occluders
  whiten     the text projection started as a centred whitening of MiniLM's caption embeddings
  separable  every 3x3 convolution of the stem depthwise-separable
  relu       ReLU instead of GELU in the stem
Recipe fields (held_in_weights, held_out_fraction, lr, dihedral, ...) go in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch import nn

from uniil.backbones import micro, micro_eval, micro_train
from uniil.backbones.factory import Backbone
from uniil.backbones.spec import BackboneSpec
from uniil.common import usable_cpus
from uniil.data.synthetic import SyntheticConfig


def separable(c_in: int, c_out: int, stride: int) -> nn.Module:
    """A depthwise-separable 3x3 convolution, for micro.ConvStem's `conv3x3`."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False))


def patch_clean(fraction: float) -> None:
    """Draw `fraction` of the images (by index, seeded) with no distractors and no occluder."""
    render, clean = micro_train.render, SyntheticConfig(clutter=0, occluder_prob=0.0)

    def patched(*args):
        k = int(args[5].bit_generator.seed_seq.entropy[2])  # _render_range seeds image k with [seed, 3, k]
        return render(*args[:6], clean) if (k * 7919) % 100 < fraction * 100 else render(*args)

    micro_train.render = patched


def patch_whiten(eps: float = 0.1) -> None:
    build = micro.build_model

    def patched(cfg=micro.MicroConfig()):
        model = build(cfg)
        from uniil.backbones.micro_captions import caption_world

        pooled = micro_train.embed_captions(model, caption_world().texts).double()
        mu = pooled.mean(0)
        lam, vecs = torch.linalg.eigh(torch.cov((pooled - mu).T))
        dim = model.text.proj.out_features
        lam, vecs = lam.flip(0)[:dim], vecs.flip(1)[:, :dim]
        w = (vecs / (lam + eps * lam.mean()).sqrt()).T
        proj = nn.Linear(w.shape[1], dim, bias=True)
        with torch.no_grad():  # rows as long on average as the random start's
            proj.weight.copy_((w / w.norm(dim=1, keepdim=True).mean() * proj.weight.norm(dim=1).mean()).float())
            proj.bias.copy_(-(proj.weight.double() @ mu).float())
        model.text.proj = proj
        return model

    micro.build_model = patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="{}", help="JSON of Recipe fields to override")
    ap.add_argument("--change", default="none", choices=["none", "clean40", "whiten", "separable", "relu"])
    args = ap.parse_args()
    torch.set_num_threads(usable_cpus())
    if args.change == "clean40":
        patch_clean(0.4)
    elif args.change == "whiten":
        patch_whiten()
    elif args.change in ("separable", "relu"):
        stem, swap = micro.ConvStem, ({"conv3x3": separable} if args.change == "separable" else {"act": nn.ReLU})
        micro.ConvStem = lambda channels, width, strides: stem(channels, width, strides, **swap)
    try:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.recipe).items()}
        recipe = dataclasses.replace(micro_train.Recipe(), **fields)
    except (ValueError, TypeError, AttributeError) as exc:
        known = ", ".join(f.name for f in dataclasses.fields(micro_train.Recipe))
        ap.error(f"the recipe must be a JSON object of Recipe fields ({known}): {exc}")
    print(recipe, "change:", args.change, flush=True)

    def figures(model, domains):
        bb = Backbone(BackboneSpec(micro.NAME, None), model, micro.preprocess(), micro.tokenizer(), 256,
                      torch.device("cpu"))
        with torch.no_grad():
            return micro_eval.figures(bb, 20, micro_eval.test_features(bb, 20, domains))

    started = time.perf_counter()

    def on_epoch(epoch, model):
        if epoch % 4 == 3 or epoch == recipe.epochs - 1:
            f = figures(model, ("photo",))
            print(f"epoch {epoch + 1} at {time.perf_counter() - started:.0f} s: photo by name "
                  f"{f.class_names['photo']:.1f}, by description {f.descriptions['photo']:.1f}", flush=True)

    model = micro_train.train(recipe, on_epoch=on_epoch)
    print(f"total {time.perf_counter() - started:.0f} s (evaluations included)", flush=True)
    f = figures(model, micro_eval.DOMAINS)
    print("by name", {k: round(v, 1) for k, v in f.class_names.items()})
    print("by description", {k: round(v, 1) for k, v in f.descriptions.items()})


if __name__ == "__main__":
    main()
