"""calfuse on cached features against finetune, same scenario and backbone, timed in one run
(issue 7: calfuse takes less than a quarter of finetune's time on synthetic-uniil).

    .venv/bin/python benchmarks/bench_calfuse.py [--clip-model uniil-tiny] [--reps 2] [--threads N]

1. The frozen-feature cache (UNIIL_CACHE_DIR; a fresh temporary folder unless it is set) is
   warmed first: every step's train and test split is encoded once, and that time is reported
   apart. calfuse (and zeroshot) then read features from it; finetune renders and encodes images
   in every run, as it must (its adapters change the image tower).
2. calfuse and finetune runs alternate (`--reps` each, a fresh run directory each time) so machine
   load hits both alike; the medians are compared. "run" is the whole `train()` call (backbone
   load, text embeddings, training, evaluation); "train+eval" sums the engine's per-step timings.
3. One zeroshot run gives the reference accuracy; accuracies of all three are printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path


def load_first(clip_model: str) -> float:
    """Load the backbone once (a trained built-in such as uniil-micro trains on first use)."""
    from uniil.backbones.factory import load_backbone
    from uniil.backbones.spec import BackboneSpec

    t = time.perf_counter()
    load_backbone(BackboneSpec.from_options(clip_model, None))
    return time.perf_counter() - t


def warm_cache(scenario: str, clip_model: str, train_pc: int, test_pc: int) -> tuple[float, int]:
    from uniil.backbones.features import image_features
    from uniil.backbones.spec import BackboneSpec
    from uniil.trainer.sources import DataOptions, step_source
    from uniil.trainer.scenario import load_scenario

    spec = BackboneSpec.from_options(clip_model, None)
    opts = DataOptions(None, False, train_pc, test_pc)
    t, n = time.perf_counter(), 0
    for step in load_scenario(scenario).steps:
        for split in ("train", "test"):
            n += len(image_features(step_source(step, split, opts), spec).features)
    return time.perf_counter() - t, n


def one_run(method: str, args, root: Path, tag: str) -> dict:
    from uniil.trainer.config import TrainConfig
    from uniil.trainer.engine import train

    cfg = TrainConfig(args.scenario, method, root / f"{method}-{tag}", clip_model=args.clip_model,
                      batch_size=args.batch_size, epochs=args.epochs, synthetic_train_per_class=args.train_per_class,
                      synthetic_test_per_class=args.test_per_class, seed=0)
    t = time.perf_counter()
    record = train(cfg)
    wall = time.perf_counter() - t
    m = record.class_il
    return {"wall": wall, "train_eval": sum(record.timings.train_s) + sum(record.timings.eval_s),
            "train": sum(record.timings.train_s), "last": m.last, "avg_inc": m.avg_incremental, "avg": m.avg,
            "forgetting": m.forgetting, "task_last": record.task_il.last if record.task_il else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="synthetic-uniil")
    ap.add_argument("--clip-model", default="uniil-tiny")
    ap.add_argument("--train-per-class", type=int, default=40)
    ap.add_argument("--test-per-class", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    own_cache = None
    if not os.environ.get("UNIIL_CACHE_DIR"):
        own_cache = tempfile.TemporaryDirectory(prefix="uniil-bench-cache-")
        os.environ["UNIIL_CACHE_DIR"] = own_cache.name
    print(f"scenario {args.scenario}, backbone {args.clip_model}, {args.train_per_class}/{args.test_per_class} "
          f"train/test images per class, batch {args.batch_size}, {args.epochs} epoch(s), torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"backbone loaded first in {load_first(args.clip_model):.1f} s (a trained built-in trains on first use)")
    warm_s, n = warm_cache(args.scenario, args.clip_model, args.train_per_class, args.test_per_class)
    print(f"feature cache warmed first: {n} images in {warm_s:.1f} s (not counted below; calfuse reads "
          f"the cache, finetune renders and encodes its images in every run)")
    runs: dict[str, list[dict]] = {"calfuse": [], "finetune": []}
    with tempfile.TemporaryDirectory(prefix="uniil-bench-runs-") as tmp:
        root = Path(tmp)
        one_run("calfuse", args, root, "warmup")  # imports, first backbone load
        for r in range(args.reps):
            for method in ("calfuse", "finetune"):
                runs[method].append(one_run(method, args, root, str(r)))
        zs = one_run("zeroshot", args, root, "ref")
    med = {m: {k: statistics.median(x[k] for x in rs) for k in ("wall", "train_eval", "train")} for m, rs in runs.items()}
    print(f"\n{'':10s} {'run (s)':>9s} {'train+eval (s)':>15s} {'train (s)':>10s}   medians of {args.reps}")
    for m in ("calfuse", "finetune"):
        print(f"{m:10s} {med[m]['wall']:9.2f} {med[m]['train_eval']:15.2f} {med[m]['train']:10.2f}")
    ratio = med["calfuse"]["wall"] / med["finetune"]["wall"]
    ratio_te = med["calfuse"]["train_eval"] / med["finetune"]["train_eval"]
    print(f"calfuse / finetune: run {ratio:.3f}, train+eval {ratio_te:.3f} (target < 0.25: "
          f"{'met' if ratio < 0.25 else 'not met'})")
    print(f"\naccuracy (%, class-IL; task-IL Last where the scenario has several datasets), {args.clip_model}:")
    print(f"{'':10s} {'Last':>6s} {'Avg':>6s} {'AvgInc':>7s} {'Forget':>7s} {'taskIL Last':>12s}")
    for m, rec in (("zeroshot", zs), ("finetune", runs["finetune"][0]), ("calfuse", runs["calfuse"][0])):
        task = f"{rec['task_last']:12.1f}" if rec["task_last"] is not None else f"{'-':>12s}"
        print(f"{m:10s} {rec['last']:6.1f} {rec['avg']:6.1f} {rec['avg_inc']:7.1f} {rec['forgetting']:7.1f} {task}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if own_cache is not None:
        own_cache.cleanup()


if __name__ == "__main__":
    main()
