"""Shared by the MoE tests: a fresh tiny CLIP per method, the synthetic-uniil scenario, a small
in-memory attribute pool, step data and batches, and one engine-like training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniil.attrpool.match import PoolAttributes
from uniil.attrpool.zeroshot import class_text_embeddings
from uniil.backbones.factory import load_backbone
from uniil.backbones.spec import BackboneSpec
from uniil.trainer.sources import DataOptions, TensorImages, global_targets, step_source, vocabulary
from uniil.trainer.methods.base import Batch, RunContext, StepData
from uniil.trainer.methods.mage import Mage
from uniil.trainer.methods.moe_adapters import MoEAdapters
from uniil.trainer.scenario import load_scenario

OPTS = DataOptions(None, False, 2, 2)


@pytest.fixture(autouse=True)
def moe_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def world():
    """A fresh tiny CLIP, the synthetic-uniil scenario and its class texts."""
    torch.manual_seed(0)
    clip = load_backbone(BackboneSpec.from_options("uniil-tiny", None))
    scenario = load_scenario("synthetic-uniil")
    vocab = vocabulary(scenario)
    text = torch.from_numpy(class_text_embeddings(clip, list(vocab.names)))
    return clip, scenario, vocab, text


def fake_pool(clip, vocab, scenario) -> PoolAttributes:
    """Two class attributes per class (none for 'circle') and one per domain, embedded by the CLIP."""
    texts, kinds, sources = [], [], []
    for name in dict.fromkeys(vocab.names):
        if name != "circle":
            for j in range(2):
                texts.append(f"{name} attribute {j}")
                kinds.append("class")
                sources.append([name])
    for domain in dict.fromkeys(s.domain for s in scenario.steps):
        texts.append(f"{domain} style")
        kinds.append("domain")
        sources.append([domain])
    return PoolAttributes(clip.spec, texts, np.array(kinds), clip.encode_text(texts), sources, None)


def step_data(scenario, vocab, t) -> StepData:
    step = scenario.steps[t]
    classes = torch.tensor([vocab.index(step.dataset, y) for y in step.labels])
    seen = sorted({vocab.index(s.dataset, y) for s in scenario.steps[:t + 1] for y in s.labels})
    return StepData(t, step, classes, torch.tensor(seen), step_source(step, "train", OPTS))


def batch_of(clip, vocab, data, n=8) -> Batch:
    source = data.train_source
    targets = global_targets(source, vocab)
    images = TensorImages(source, clip.preprocess, targets)
    idx = torch.arange(min(n, len(source)))
    return Batch(torch.stack([images[int(i)][0] for i in idx]), targets[idx], idx, source)


def fresh_clip():
    """The same tiny CLIP again (adapters go into the model a method gets, so one per method)."""
    return load_backbone(BackboneSpec.from_options("uniil-tiny", None))


def moe(world, **options):
    clip, scenario, vocab, text = world
    return MoEAdapters(fresh_clip(), text, options)


def mage(world, **options):
    clip, scenario, vocab, text = world
    return Mage(fresh_clip(), text, options, RunContext(pool=fake_pool(clip, vocab, scenario)))


def train(method, world, t, iters=3, weight_decay=0.0):
    """What the engine does for one step: begin, a fresh AdamW over trainable parameters, end."""
    clip, scenario, vocab, _ = world
    data = step_data(scenario, vocab, t)
    method.begin_step(t, data)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=weight_decay)
    method.train()
    batch = batch_of(clip, vocab, data)
    for _ in range(iters):
        loss = method(batch, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.eval()
    method.end_step(t, data)
    return data, batch
