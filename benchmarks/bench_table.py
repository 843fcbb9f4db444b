"""Read a `uniil bench` folder and print what benchmarks/RESULTS.md reports about it:

- each entry's own-step accuracy A[t][t] (class-IL, right after training step t), mean over
  steps, and its gain over an entry taken as the zero-shot reference (the budget target);
- which differences of the bench's metrics exceed two standard deviations (|mean_a - mean_b| >
  2 * max(std_a, std_b), stds over seeds, n - 1), for every pair of entries;
- time: training and evaluation seconds per run, training images/s (median over runs), and the
  wall-clock of the whole grid from the runs' own timings.

    .venv/bin/python benchmarks/bench_table.py BENCH_DIR[:ENTRY,...] [BENCH_DIR ...] [--reference zeroshot]

Several folders (benches of the same scenario, run at different times) are read as one grid; an
entry's label must be unique across them. `DIR:a,b` reads only entries a and b of DIR (where a later
bench reran some entries, e.g. with a re-swept recipe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

from uniil.trainer.bench import BENCH_METRICS
from uniil.trainer.records import MetricsRecord


def load(bench_dirs: list[Path | str]) -> dict:
    """{"results": bench.json's results of every folder, "runs": {label: finished runs' records}}."""
    results: dict[str, dict] = {}
    runs: dict[str, list[MetricsRecord]] = {}
    for spec in bench_dirs:
        bench_dir, _, only = str(spec).partition(":")
        bench_dir = Path(bench_dir)
        if not (bench_dir / "bench.json").is_file():
            sys.exit(f"{bench_dir} has no bench.json; name a folder that `uniil bench --out` wrote")
        data = json.loads((bench_dir / "bench.json").read_text())
        wanted = set(only.split(",")) if only else set(data["results"])
        if missing := wanted - set(data["results"]):
            sys.exit(f"{bench_dir} has no entry {', '.join(sorted(missing))}; it has {', '.join(data['results'])}")
        for label, res in data["results"].items():
            if label not in wanted:
                continue
            if label in results:
                sys.exit(f"entry {label} is in two of the folders; rename it in one (uniil bench --methods NEW=METHOD)")
            results[label] = res
            for seed, info in res["seeds"].items():
                if info["status"] != "failed":
                    runs.setdefault(label, []).append(MetricsRecord.load(bench_dir / info["path"] / "metrics.json"))
    return {"results": results, "runs": runs}


def diagonal(record: MetricsRecord) -> float:
    a = np.array(record.class_il.accuracy_matrix, dtype=np.float64)
    return float(np.mean(np.diag(a)))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def fmt(m: float, s: float | None) -> str:
    return f"{m:.1f}" + (f" ± {s:.1f}" if s is not None else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_dirs", nargs="+", metavar="BENCH_DIR[:ENTRY,...]")
    ap.add_argument("--reference", default="zeroshot", help="the entry the diagonal gain is measured against")
    args = ap.parse_args(argv)
    got = load(args.bench_dirs)
    runs, results = got["runs"], got["results"]

    print("## Own-step accuracy A[t][t], class-IL, mean over steps (mean ± std over seeds)\n")
    print("| entry | mean A[t][t] | gain over " + args.reference + " |\n|---|---|---|")
    ref = [diagonal(r) for r in runs.get(args.reference, [])]
    for label, recs in runs.items():
        d = [diagonal(r) for r in recs]
        gain = fmt(*mean_std([x - y for x, y in zip(d, ref)])) if ref and len(ref) == len(d) else "-"
        print(f"| {label} | {fmt(*mean_std(d))} | {gain} |")

    print("\n## Differences beyond two standard deviations (|Δ mean| > 2 max(std))\n")
    for key, header in BENCH_METRICS:
        real = []
        for a, b in combinations(results, 2):
            ma, mb = results[a]["mean"].get(key), results[b]["mean"].get(key)
            sa, sb = results[a]["std"].get(key), results[b]["std"].get(key)
            if None in (ma, mb, sa, sb):
                continue
            if abs(ma - mb) > 2 * max(sa, sb):
                hi, lo = (a, b) if ma > mb else (b, a)
                real.append(f"{hi} > {lo} ({abs(ma - mb):.1f})")
        print(f"- {header}: " + ("; ".join(real) if real else "none"))

    print("\n## Time per run (median over seeds)\n")
    print("| entry | train s | eval s | total s | train images/s |\n|---|---|---|---|---|")
    grid = 0.0
    for label, recs in runs.items():
        train = [sum(r.timings.train_s) for r in recs]
        ev = [sum(r.timings.eval_s) for r in recs]
        ips = [x for r in recs for x in r.timings.images_per_s if x]
        grid += sum(train) + sum(ev)
        print(f"| {label} | {statistics.median(train):.0f} | {statistics.median(ev):.0f} | "
              f"{statistics.median([t + e for t, e in zip(train, ev)]):.0f} | "
              f"{statistics.median(ips):.0f} |" if ips else
              f"| {label} | {statistics.median(train):.0f} | {statistics.median(ev):.0f} | "
              f"{statistics.median([t + e for t, e in zip(train, ev)]):.0f} | - |")
    print(f"\nTraining and evaluation of all runs: {grid / 60:.1f} min (model loading and rendering not included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
