"""Training throughput (images/s) of `uniil train`'s inner step: forward, backward and AdamW of the
finetune method (one adapter per block) on the tiny backbone and on ViT-B-16 (random weights).

    .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--precision fp32|bf16]

Batches are random tensors of the model's input size, so only the model is timed (data loading is
measured by the engine's own per-step images/s in metrics.json).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from uniil.backbones.factory import load_backbone
from uniil.backbones.spec import BackboneSpec
from uniil.trainer.methods.base import Batch, StepData
from uniil.trainer.methods.finetune import Finetune


def throughput(model_name: str, batch: int, steps: int, device: str, precision: str) -> float:
    clip = load_backbone(BackboneSpec.from_options(model_name, "none"), device=device)
    size = clip.preprocess.transforms[1].size[0] if hasattr(clip.preprocess.transforms[1], "size") else 224
    text = torch.nn.functional.normalize(torch.randn(100, clip.dim, device=device), dim=-1)
    method = Finetune(clip, text, {}).to(device)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    classes = torch.arange(10, device=device)
    data = StepData(0, None, classes, classes)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = method(Batch(x, y, torch.arange(batch)), data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [("uniil-tiny", 128, 20), ("ViT-B-16", 32 if args.device == "cpu" else 256, 5 if args.device == "cpu" else 20)]
    print(f"device {args.device}, precision {args.precision}, torch threads {torch.get_num_threads()}")
    for name, batch, steps in rows:
        ips = throughput(name, batch, steps, args.device, args.precision)
        print(f"{name:12s} batch {batch:4d}: {ips:8.1f} images/s (median of {steps} steps)")


if __name__ == "__main__":
    main()
