"""The MoE adapter layer's cost (issue 6), each comparison measured side by side in one run.

(a) A training step (forward, backward, AdamW) with the MoE layer (E = 22, top-2, noisy router,
    load-balancing loss) against one with a dense adapter per block (E = 1), on uniil-tiny and on
    ViT-B-16 with random weights. Target: ratio <= 1.3.
(b) At E = 22, the batched layer (ExpertBank: grouped GEMMs below 64 tokens per sample on CPU,
    per-sample weight gather + two bmm otherwise) against a loop-over-experts
    sparse dispatcher as the original MoE-Adapters code dispatches (per expert, the samples routed
    to it; sizes read on the host). Measured on the expert dispatch alone (forward + backward), at
    each backbone's width and token count, and inside a whole training step. Target: >= 2x faster.

Timings interleave the two sides: medians per side, and the median of the paired ratios. The CPU
machine is shared: by default torch runs one thread, because two OpenMP threads on a loaded 2-core
machine are erratic (a uniil-tiny forward took 0.4 s with 2 threads and 2.5 ms with 1 while other
jobs ran).

    .venv/bin/python benchmarks/bench_moe.py [--reps 7] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from uniil.backbones.factory import load_backbone
from uniil.backbones.spec import BackboneSpec
from uniil.trainer.adapters import Adapters, ExpertBank, RoutingContext, load_balancing_loss, noisy_logits

E, K = 22, 2
MODELS = {"uniil-tiny": (None, 64, 32), "ViT-B-16": ("none", 8, 224)}  # pretrained, batch, image size


class LoopExpertBank(ExpertBank):
    """The original's sparse dispatcher: for each expert, the samples whose top-k include it."""

    def forward(self, x, weights, indices):
        down, down_bias, up, up_bias = self.tensors()
        gates = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter(1, indices, weights.float())
        pairs = gates.nonzero()  # (sample, expert), host sync
        pairs = pairs[pairs[:, 1].argsort(stable=True)]
        samples, experts = pairs[:, 0], pairs[:, 1]
        sizes = (gates > 0).sum(0).tolist()  # host sync
        outs = []
        for e, part in enumerate(x[samples].split(sizes)):
            if len(part):
                h = self.dropout(F.relu(part @ down[e] + down_bias[e]))
                outs.append(h @ up[e] + up_bias[e])
        stitched = torch.cat(outs) * gates[samples, experts].to(x.dtype)[:, None, None]
        return self.scale * torch.zeros_like(x).index_add(0, samples, stitched)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved(fns: dict, reps: int, device: str) -> dict:
    """Median seconds per side, plus "ratio": the median over repetitions of second / first side,
    each pair timed back to back (robust to the load drifting on a shared machine)."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    first, second = times.values()
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = statistics.median(b / a for a, b in zip(first, second))
    return out


def _trainer(model: str, num_experts: int, batch: int, size: int, device: str, loop: bool = False):
    pretrained = MODELS[model][0]
    clip = load_backbone(BackboneSpec.from_options(model, pretrained), device=device)
    adapters = Adapters(clip.model, num_experts=num_experts).to(device)
    if loop:
        for bank in adapters.banks:
            bank.__class__ = LoopExpertBank
    w = torch.zeros(adapters.num_layers, adapters.width, num_experts, device=device, requires_grad=True)
    w_noise = torch.zeros_like(w, requires_grad=True)
    with torch.no_grad():  # trained-looking experts, so no branch is trivially zero
        for bank in adapters.banks:
            bank.up.normal_(std=0.02)
    params = list(adapters.parameters()) + ([w, w_noise] if num_experts > 1 else [])
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    protos = F.normalize(torch.randn(10, clip.dim, generator=gen), dim=-1).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step():
        router = None if num_experts == 1 else \
            (lambda layer, cls: noisy_logits(cls @ w[layer], cls @ w_noise[layer], True))
        ctx = RoutingContext(router, K if num_experts > 1 else 1)
        with adapters.routing(ctx):
            feats = F.normalize(clip.model.encode_image(x).float(), dim=-1)
        loss = F.cross_entropy(100 * feats @ protos.T, y)
        if num_experts > 1:
            loss = loss + 0.01 * load_balancing_loss(ctx.gates, num_experts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _dispatch(width: int, tokens: int, batch: int, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    batched = ExpertBank(width, E).to(device)
    with torch.no_grad():
        batched.up.normal_(std=0.02)
    loop = LoopExpertBank(width, E).to(device)
    loop.load_state_dict(batched.state_dict())
    x = torch.randn(batch, tokens, width, generator=gen).to(device).requires_grad_()
    top = torch.randn(batch, E, generator=gen).to(device).topk(K, dim=-1)
    weights, indices = top.values.softmax(-1), top.indices
    assert torch.allclose(batched(x, weights, indices), loop(x, weights, indices), atol=1e-5)
    grad = torch.randn(batch, tokens, width, generator=gen).to(device)

    def run(bank):
        def fn():
            bank(x, weights, indices).backward(grad)
        return fn
    return {"batched": run(batched), "loop": run(loop)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="uniil-tiny,ViT-B-16")
    ap.add_argument("--parts", default="a,b,step", help="a: MoE vs dense step; b: dispatch; step: b inside a step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, median of {args.reps}")
    parts = args.parts.split(",")
    if "a" in parts:
        print("\n(a) training step, MoE (E=22, top-2) vs one dense adapter per block (target <= 1.3)")
    for model in models if "a" in parts else []:
        _, batch, size = MODELS[model]
        t = _interleaved({"dense": _trainer(model, 1, batch, size, args.device),
                          "moe": _trainer(model, E, batch, size, args.device)}, args.reps, args.device)
        print(f"  {model:11s} batch {batch:3d}: dense {t['dense'] * 1e3:8.1f} ms  moe {t['moe'] * 1e3:8.1f} ms  "
              f"ratio {t['ratio']:.2f}")
    if "b" in parts or "step" in parts:
        print("\n(b) E=22 batched layer vs loop-over-experts dispatcher (target >= 2x)")
    shapes = {"uniil-tiny": (128, 17, 64), "ViT-B-16": (768, 197, 64)}
    for model in models if "b" in parts else []:
        width, tokens, batch = shapes[model]
        t = _interleaved(_dispatch(width, tokens, batch, args.device), args.reps, args.device)
        print(f"  dispatch {model:11s} [{batch}, {tokens}, {width}]: batched {t['batched'] * 1e3:8.1f} ms  "
              f"loop {t['loop'] * 1e3:8.1f} ms  speed-up {t['ratio']:.2f}x")
    for model in models if "step" in parts else []:
        _, batch, size = MODELS[model]
        t = _interleaved({"batched": _trainer(model, E, batch, size, args.device),
                          "loop": _trainer(model, E, batch, size, args.device, loop=True)}, args.reps, args.device)
        print(f"  training step {model:11s} batch {batch:3d}: batched {t['batched'] * 1e3:8.1f} ms  "
              f"loop {t['loop'] * 1e3:8.1f} ms  speed-up {t['ratio']:.2f}x")


if __name__ == "__main__":
    main()
