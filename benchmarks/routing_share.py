"""Does a step of an MoE method learn only as far as its images reach experts it can train?

For every finished run of `moe-adapters` or `mage` under the given folders (run directories or
`uniil bench`/`uniil sweep` outputs), each step after the first: the share of its training routing
that reached experts trainable during the step (metrics.json's `trainable_share`, or, for runs
recorded before it existed, the step's usage against the previous step's frozen experts) and the
step's own accuracy (the accuracy matrix's diagonal). Prints the steps whose share fell below
--below with the median own accuracy of the same step over all runs, and per step the correlation
of share and own accuracy.

    .venv/bin/python benchmarks/routing_share.py bench_ref3 bench_llm sweep_mage2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np


def shares(metrics: dict) -> list[float | None]:
    """Per step (the first included, always 1), the mean over blocks of the trainable share."""
    stats = metrics["statistics"]
    out: list[float | None] = []
    for t, step in enumerate(stats):
        per_block = step.get("trainable_share")
        if per_block is None:
            frozen = stats[t - 1]["frozen"] if t else [[] for _ in step["usage"]]
            experts = range(len(step["usage"][0]))
            # mage's novelty_reserve: a step that opens experts trains only those (it froze the rest)
            trainable = [set(step["opened"]) if step.get("opened") else {e for e in experts if e not in set(fr)}
                         for fr in frozen]
            per_block = [sum(row[e] for e in mine) / sum(row) if sum(row) else None
                         for row, mine in zip(step["usage"], trainable)]
        known = [s for s in per_block if s is not None]
        out.append(sum(known) / len(known) if known else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--below", type=float, default=0.05, help="list the steps whose share is below this")
    args = ap.parse_args()
    rows = []  # (run, step number, share, own accuracy)
    for folder in args.folders:
        for path in sorted(folder.rglob("metrics.json")):
            m = json.loads(path.read_text())
            matrix = m.get("accuracy_matrix") or []
            if m.get("method") not in ("mage", "moe-adapters") or m.get("finished_steps") != len(m.get("steps", [])):
                continue
            for t, share in enumerate(shares(m)):
                if t and share is not None:
                    rows.append((str(path.parent), t + 1, share, matrix[t][t]))
    if not rows:
        raise SystemExit("no finished mage or moe-adapters run under " + ", ".join(map(str, args.folders)))
    print(f"{len(rows)} steps (after the first) of {len({r[0] for r in rows})} runs")
    for run, step, share, own in (r for r in rows if r[2] < args.below):
        median = statistics.median(r[3] for r in rows if r[1] == step)
        print(f"share {share:.2f} < {args.below}: {run} step {step}: own accuracy {own:.1f} "
              f"(median of step {step} over the runs: {median:.1f})")
    print("| step | runs | median share | median own accuracy | correlation share-own |")
    print("|---|---|---|---|---|")
    for step in sorted({r[1] for r in rows}):
        sel = [r for r in rows if r[1] == step]
        x, y = np.array([r[2] for r in sel]), np.array([r[3] for r in sel])
        corr = np.corrcoef(x, y)[0, 1] if len(sel) > 2 and x.std() > 0 and y.std() > 0 else float("nan")
        print(f"| {step} | {len(sel)} | {np.median(x):.2f} | {np.median(y):.1f} | {corr:.2f} |")


if __name__ == "__main__":
    main()
