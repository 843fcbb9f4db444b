"""The continual-learning loop: for each step, train the method, then evaluate on every step's
test set (future ones too, for Transfer), checkpoint, and write metrics.json.

Determinism: every step re-seeds from (seed, step), and its data order comes from a generator
seeded the same way, so a run resumed after step t ends exactly as an uninterrupted one (CPU).
Distributed runs (torchrun) wrap the method in DistributedDataParallel; each rank trains on an
equal shard of every epoch's permutation and evaluates a shard of each test set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata

import numpy as np
import torch

from ..backbones.spec import BackboneSpec
from ..errors import UserError
from . import checkpoint as ckpt
from .config import DEFAULT_WARMUP, TrainConfig
from .records import MetricsRecord, StepInfo
from .sources import DataOptions, TensorImages, cached_features, global_targets, materialise, step_source, vocabulary
from .methods.base import Batch, ContinualMethod, RunContext, StepData, method_class
from ..typed_options import options_json

log = logging.getLogger(__name__)


@dataclass
class StepSummary:
    index: int
    total: int
    kind: str
    name: str
    train_s: float
    eval_s: float
    images_per_s: float | None
    accuracy: float  # class-IL accuracy on this step's test set right after training it
    seen_mean: float  # mean class-IL accuracy over the steps seen so far


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            torch.distributed.init_process_group(backend)
        if self.enabled and device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def _seed(seed: int, t: int) -> int:
    return (seed * 1_000_003 + t * 7919) % (2 ** 31)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("uniil", "torch", "open_clip_torch", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, progress=None, on_step=None):
        cfg.validate()
        from .scenario import load_scenario

        self.cfg, self.progress, self.on_step = cfg, progress, on_step
        self.scenario = load_scenario(cfg.scenario)
        self.method_cls: type[ContinualMethod] = method_class(cfg.method)
        self.method_opts = self.method_cls.parse_options(cfg.method_options)  # a typo fails before anything loads
        # The run records the resolved, typed options (presets and defaults applied), not the text given.
        self.cfg = cfg = dataclasses.replace(cfg, method_options=options_json(self.method_opts))
        self.spec = BackboneSpec.from_options(cfg.clip_model, cfg.clip_pretrained)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        self.dist = Dist(cfg.device)
        self.vocab = vocabulary(self.scenario)
        self.data_opts = DataOptions(str(cfg.data_root) if cfg.data_root else None, cfg.download,
                                     cfg.synthetic_train_per_class, cfg.synthetic_test_per_class, cfg.eval_split)
        self._test_cache: dict[int, tuple] = {}
        self.pool_attrs = self._load_pool()

    # -- set-up ---------------------------------------------------------------------------------
    def _load_pool(self):
        if self.cfg.pool is None:
            if self.method_cls.requires_pool(self.method_opts):
                defaults = self.method_cls.options_record({})
                given = " ".join(f"--opt {k}={v}" for k, v in self.cfg.method_options.items() if defaults.get(k) != v)
                raise UserError(f"method {self.cfg.method}{' with ' + given if given else ''} needs an attribute "
                                f"pool: pass --pool P.duckdb "
                                f"(build one with `uniil attrs build --dataset ... {self.spec.cli_options()}`)")
            return None
        from ..attrpool.match import PoolAttributes

        attrs = PoolAttributes.load(self.cfg.pool)
        if attrs.backbone.id != self.spec.id:
            raise UserError(f"pool {self.cfg.pool} was built with backbone {attrs.backbone.id}, but this run uses "
                            f"{self.spec.id}; pass {attrs.backbone.cli_options()} or build a pool for this backbone")
        return attrs

    def _build_method(self) -> ContinualMethod:
        from ..attrpool.zeroshot import class_text_embeddings
        from ..backbones.factory import load_backbone

        self.clip = load_backbone(self.spec, device=str(self.device), progress=self.progress if self.dist.main else None)
        templates = tuple(self.method_opts.templates.split("|"))
        text = torch.from_numpy(class_text_embeddings(self.clip, list(self.vocab.names), templates))
        context = RunContext(self.pool_attrs, tuple(self.vocab.names), tuple(k[0] for k in self.vocab.keys), templates,
                             self.data_opts, self.device)
        method = self.method_cls(self.clip, text.to(self.device), self.method_opts, context)
        return method.to(self.device)

    def _resume_identity(self) -> dict:
        """The identity --resume compares; method options an earlier version recorded (as given,
        not resolved) count as the same when they resolve to the same typed options."""
        path = self.cfg.out / ckpt.CONFIG
        if not (self.cfg.resume and path.is_file()):
            return self.cfg.identity()
        stored = ckpt.read_json(path).get("identity", {})
        return self.cfg.identity_against(stored, self.method_cls.options_record, self._recorded_version)

    def _recorded_version(self) -> str:
        metrics = self.cfg.out / ckpt.METRICS
        version = MetricsRecord.load(metrics).versions.get("uniil") if metrics.is_file() else None
        return f"uniil {version}" if version else "an earlier uniil"

    def _step_data(self, t: int, with_source: bool) -> StepData:
        step = self.scenario.steps[t]
        classes = torch.tensor([self.vocab.index(step.dataset, y) for y in step.labels], device=self.device)
        seen = sorted({self.vocab.index(s.dataset, y) for s in self.scenario.steps[:t + 1] for y in s.labels})
        source = step_source(step, "train", self.data_opts) if with_source else None
        return StepData(t, step, classes, torch.tensor(seen, device=self.device), source)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> MetricsRecord:
        cfg = self.cfg
        record = ckpt.check_resume(cfg.out, self._resume_identity(), cfg.resume)
        torch.manual_seed(_seed(cfg.seed, -1))  # initial method parameters depend on the seed alone
        self.method = self._build_method()
        steps = self.scenario.steps
        start = 0 if record is None else record.finished_steps
        if record is None:
            record = self._new_record()
            if self.dist.main:
                cfg.out.mkdir(parents=True, exist_ok=True)
                ckpt.write_json(cfg.out / ckpt.CONFIG, {"identity": cfg.identity(), "config": cfg.as_json()})
        if start:
            for t in range(start):  # rebuild per-step structure, then load the last finished state
                self.method.begin_step(t, self._step_data(t, with_source=False))
            tensors, extra = ckpt.load_step(cfg.out, start - 1)
            self.method.load_trainable_state(tensors)
            self.method.load_extra_state(extra.get("method", {}))
            log.info("resuming %s after step %d of %d", cfg.out, start, len(steps))
        for t in range(start, len(steps)):
            self._run_step(t, record)
        self.dist.barrier()
        return record

    def _new_record(self) -> MetricsRecord:
        return MetricsRecord(self.scenario.name, self.cfg.method, self.spec.id, self.cfg.seed,
                             [StepInfo(s.dataset, s.domain, s.kind, tuple(s.classes)) for s in self.scenario.steps],
                             config=self.cfg.as_json(), versions=versions())

    def _run_step(self, t: int, record: MetricsRecord) -> None:
        seed = _seed(self.cfg.seed, t)
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32 - 1))
        data = self._step_data(t, with_source=True)
        self.method.begin_step(t, data)
        t0 = time.perf_counter()
        seen_images = self._train(t, data, seed) if self.method.trains else 0
        self.method.end_step(t, data)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        row, task_row, sizes = self._evaluate_all(t)
        eval_s = time.perf_counter() - t1
        record.add_step(row, task_row, sizes, train_s, eval_s,
                        round(seen_images / train_s, 1) if seen_images else None, self.method.statistics())
        if self.dist.main:
            ckpt.save_step(self.cfg.out, t, self.method.trainable_state(),
                           {"method": self.method.extra_state(), "step": t + 1}, record.to_json())
        if self.on_step and self.dist.main:
            self.on_step(StepSummary(t + 1, len(self.scenario.steps), data.step.kind,
                                     f"{data.step.dataset}/{data.step.domain}", train_s, eval_s,
                                     record.timings.images_per_s[-1], row[t], float(np.mean(row[:t + 1]))))

    # -- training -------------------------------------------------------------------------------
    def _train(self, t: int, data: StepData, seed: int) -> int:
        cfg, dist = self.cfg, self.dist
        source = data.train_source
        targets = global_targets(source, self.vocab)
        n = len(source)
        if n == 0:
            raise UserError(f"step {t + 1} ({data.step.dataset}/{data.step.domain}) has no training images")
        features = images = tensor = None
        if self.method.uses_frozen_features:
            features = self._frozen_features(source)
        else:
            images = TensorImages(source, self.clip.preprocess, targets)
            tensor = materialise(images, self.progress, "load") if dist.main or not self.progress else \
                materialise(images)
        per_rank = max(1, cfg.batch_size // dist.world)
        shard_len = n // dist.world
        batches_per_epoch = max(1, math.ceil(shard_len / per_rank))
        total = cfg.iters or cfg.epochs * batches_per_epoch
        params = [p for p in self.method.parameters() if p.requires_grad]
        if not params:
            return 0
        model = self.method
        if dist.enabled:
            # Buffers change only between steps, identically on every rank: nothing to broadcast per batch.
            model = torch.nn.parallel.DistributedDataParallel(self.method, find_unused_parameters=True,
                                                              broadcast_buffers=False)
        opt = torch.optim.AdamW(params, lr=self.method.learning_rate(data, cfg.lr), weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, total=total,
                                                               warmup=effective_warmup(cfg.warmup, total)))
        autocast, scaler = self._precision()
        gen = torch.Generator().manual_seed(seed)
        task = f"train{t}"
        if self.progress and dist.main:
            self.progress.start(task, f"step {t + 1}/{len(self.scenario.steps)} training", total)
        self.method.train()
        it, seen = 0, 0
        while it < total:
            perm = torch.randperm(n, generator=gen)[:shard_len * dist.world]
            shard = perm[dist.rank::dist.world]
            for b in range(0, len(shard), per_rank):
                idx = shard[b:b + per_rank]
                batch = self._batch(idx, targets, source, tensor, images, features)
                with autocast():
                    loss = model(batch, data)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                it += 1
                seen += len(idx) * dist.world
                if self.progress and dist.main:
                    self.progress.advance(task, 1)
                if it >= total:
                    break
        if not torch.isfinite(loss.detach()).all():
            raise UserError(f"step {t + 1}: the training loss is {loss.item()}; lower --lr or use --precision fp32")
        if self.progress and dist.main:
            self.progress.stop(task)
        self.method.eval()
        return seen

    def _batch(self, idx, targets, source, tensor, images, features) -> Batch:
        if features is not None:
            return Batch(None, targets[idx].to(self.device), idx, source, features[idx].to(self.device))
        if tensor is not None:
            x = tensor[idx]
        else:
            x = torch.stack([images[int(i)][0] for i in idx])
        return Batch(x.to(self.device, non_blocking=True), targets[idx].to(self.device), idx, source)

    def _precision(self):
        p, dev = self.cfg.precision, self.device.type
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p)

        def autocast():
            return torch.autocast(device_type=dev, dtype=dtype, enabled=dtype is not None)

        scaler = torch.amp.GradScaler(dev, enabled=(p == "fp16" and dev == "cuda"))
        return autocast, scaler

    # -- evaluation -----------------------------------------------------------------------------
    def _test_set(self, i: int):
        if i not in self._test_cache:
            step = self.scenario.steps[i]
            source = step_source(step, "test", self.data_opts)
            if len(source) == 0:
                raise UserError(f"step {i + 1} ({step.dataset}/{step.domain}) has no test images")
            targets = global_targets(source, self.vocab)
            if self.method.uses_frozen_features:
                self._test_cache[i] = (source, targets, None, self._frozen_features(source))
            else:
                images = TensorImages(source, self.clip.preprocess, targets)
                self._test_cache[i] = (source, targets, materialise(images), None)
        return self._test_cache[i]

    def _frozen_features(self, source) -> torch.Tensor:
        return cached_features(source, self.spec, str(self.device), self.progress if self.dist.main else None)

    @torch.no_grad()
    def _features(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of step i's test set: (features, targets)."""
        source, targets, tensor, frozen = self._test_set(i)
        rows = torch.arange(len(source))[self.dist.rank::self.dist.world]
        bs = max(64, self.cfg.batch_size)
        autocast, _ = self._precision()
        out = []
        for b in range(0, len(rows), bs):
            idx = rows[b:b + bs]
            if frozen is not None:
                batch = Batch(None, targets[idx], idx, source, frozen[idx].to(self.device))
            else:
                x = tensor[idx] if tensor is not None else \
                    torch.stack([TensorImages(source, self.clip.preprocess, targets)[int(j)][0] for j in idx])
                batch = Batch(x.to(self.device), targets[idx].to(self.device), idx, source)
            with autocast():
                out.append(self.method.encode(batch).float())
        feats = torch.cat(out) if out else torch.zeros(0, self.clip.dim, device=self.device)
        return feats, targets[rows].to(self.device)

    @torch.no_grad()
    def _evaluate_all(self, j: int) -> tuple[list[float], list[float] | None, list[int]]:
        """Row j of the accuracy matrix, class-IL and (several datasets) task-IL, in percent."""
        self.method.eval()
        steps = self.scenario.steps
        seen = {self.vocab.index(s.dataset, y) for s in steps[:j + 1] for y in s.labels}
        several = len(self.scenario.datasets) > 1
        counts, sizes = [], []
        task = f"eval{j}"
        if self.progress and self.dist.main:
            self.progress.start(task, f"step {j + 1}/{len(steps)} evaluating", len(steps))
        for i, step in enumerate(steps):
            feats, targets = self._features(i)
            own = {self.vocab.index(step.dataset, y) for y in step.labels}
            class_vocab = sorted(seen | own)
            hits = [self._hits(feats, targets, torch.tensor(class_vocab, device=self.device))]
            if several:  # the task id is known: only that dataset's classes (seen so far, and its own)
                task_vocab = [g for g in class_vocab if self.vocab.keys[g][0] == step.dataset]
                hits.append(self._hits(feats, targets, torch.tensor(task_vocab, device=self.device)))
            counts.append(self.dist.sum(hits + [float(len(targets))]))
            sizes.append(int(counts[-1][-1]))
            if self.progress and self.dist.main:
                self.progress.advance(task, 1)
        if self.progress and self.dist.main:
            self.progress.stop(task)
        row = [100.0 * c[0] / c[-1] for c in counts]
        task_row = [100.0 * c[1] / c[-1] for c in counts] if several else None
        return row, task_row, sizes

    def _hits(self, feats, targets, vocab) -> float:
        if len(targets) == 0:
            return 0.0
        logits = self.method.logits(feats, vocab)
        return float((vocab[logits.argmax(dim=1)] == targets).sum())


def effective_warmup(warmup: int | None, total: int) -> int:
    """Warm-up iterations of a step of `total`: a given --warmup as given (the papers' recipes, e.g.
    MoE-Adapters' 30 or 100), else DEFAULT_WARMUP capped at a quarter of the step, so that a short
    step still spends most of its iterations near the peak rate."""
    return warmup if warmup is not None else min(DEFAULT_WARMUP, max(0, total // 4))


def lr_factor(i: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier at iteration i: linear warm-up, then a cosine to zero."""
    if i < warmup:
        return (i + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))


def train(cfg: TrainConfig, progress=None, on_step=None) -> MetricsRecord:
    return Trainer(cfg, progress, on_step).run()
