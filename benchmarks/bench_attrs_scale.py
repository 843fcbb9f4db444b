"""`uniil attrs build` at ImageNet scale (issue 15): a 10,000-class pool, 30,000 requests, against the
loopback server answering at once.

Reports the build's total time and its parts (planning, asking, recording, dedupe, embedding,
indexing, writing the derived tables), requests/s, client and server CPU per request, peak memory,
and the finished rerun in a fresh process. Targets:

1. client side of asking + recording (the build process's CPU while it asks) at most 60 s;
2. at most 1.5 ms of client CPU per request, and 500 requests/s or more;
3. a finished rerun in at most 1.5 s, 0 requests, no model loaded;
4. the whole build (MiniLM dedupe and CLIP-text embedding of the distinct phrases included)
   reported, with its slowest part named.

Run: .venv/bin/python benchmarks/bench_attrs_scale.py [--classes 10000] [--concurrency 16]

The build runs in a child process of its own (its peak memory and CPU are its own); the server in
another (tests/llm_server.py), as a real server would be.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attrs_build import loopback_server_process, requests_served  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = "class-appearance,class-identify,class-distinguish"
HEAVY = ("torch", "open_clip", "sentence_transformers", "transformers", "llama_cpp", "faiss", "openai")


def class_names(n: int) -> list[str]:
    """n distinct names: the registry's real class names, numbered once they run out."""
    base: dict[str, str] = {}  # lower case -> name: class names are unique regardless of case
    for f in sorted((ROOT / "data" / "names").glob("*.txt")):
        for line in f.read_text(encoding="utf-8").splitlines():
            name = " ".join(line.split("\t")[-1].translate(str.maketrans('":()', "    ")).split())
            if name:
                base.setdefault(name.lower(), name)
    names = list(base.values())
    return [names[i % len(names)] + (f" {i // len(names)}" if i >= len(names) else "") for i in range(n)]


def process_cpu_s(pid: int) -> float:
    """utime + stime of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Spans:
    """Progress hook and function wrappers that time the build's parts, wall and CPU."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._open: dict[str, tuple[float, float]] = {}

    def start(self, task, description, total):
        self._open[task] = (time.perf_counter(), time.process_time())

    def advance(self, task, n=1):
        pass

    def stop(self, task):
        w, c = self._open.pop(task)
        self.wall[task] = self.wall.get(task, 0.0) + time.perf_counter() - w
        self.cpu[task] = self.cpu.get(task, 0.0) + time.process_time() - c

    def wrap(self, owner, name: str, part: str, thread_cpu: bool = False) -> None:
        fn = getattr(owner, name)
        clock = time.thread_time if thread_cpu else time.process_time

        def timed(*args, **kwargs):
            w, c = time.perf_counter(), clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[part] = self.wall.get(part, 0.0) + time.perf_counter() - w
                self.cpu[part] = self.cpu.get(part, 0.0) + clock() - c
                self.wall[part + "_calls"] = self.wall.get(part + "_calls", 0) + 1

        setattr(owner, name, timed)


def child_build(url: str, pool: Path, classes_file: Path, concurrency: int, out: Path) -> None:
    """The build, instrumented, in this (child) process; writes its timings to `out` as JSON."""
    from uniil.attrpool import build, canonical, writer
    from uniil.attrpool.build import BuildConfig, build_pool
    from uniil.attrpool.llm import LLMSpec
    from uniil.attrpool.store import PoolStore
    from uniil.backbones.spec import BackboneSpec
    from uniil.data.registry import resolve_names
    from uniil.prompts.templates import load_templates

    spans = Spans()
    spans.wrap(build, "plan_requests", "planning")
    spans.wrap(PoolStore, "add_requests", "request_rows")
    spans.wrap(PoolStore, "record_calls", "recording", thread_cpu=True)  # on the writer thread, during asking
    spans.wrap(canonical, "merge_near_duplicates", "merge")
    spans.wrap(canonical, "build_index", "indexing")
    spans.wrap(canonical, "serialize_index", "indexing")
    spans.wrap(PoolStore, "replace_attributes", "derived_tables")
    spans.wrap(PoolStore, "finish", "checkpoint")
    cfg = BuildConfig(pool=pool, names=resolve_names(None, classes_file, []),
                      llm=LLMSpec.from_options(None, url, "m", None),
                      backbone=BackboneSpec.from_options("uniil-tiny", None),
                      templates=TEMPLATES.split(","), concurrency=concurrency)
    load_templates(cfg.templates)
    t0, c0 = time.perf_counter(), time.process_time()
    report = build_pool(cfg, spans)
    total_wall, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    out.write_text(json.dumps({
        "wall": spans.wall, "cpu": spans.cpu, "total_wall": total_wall, "total_cpu": total_cpu,
        "answered": report.answered, "http_requests": report.http_requests,
        "attributes": report.stats["attributes"], "raw_attributes": report.stats["raw_attributes"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "commit_every_s": writer.COMMIT_EVERY_S}))


def rerun(url: str, pool: Path, classes_file: Path, concurrency: int) -> dict:
    """The finished rerun through the CLI in a fresh process: seconds, and heavy modules imported."""
    args = ["attrs", "build", "--pool", str(pool), "--classes", str(classes_file), "--domains", "",
            "--templates", TEMPLATES, "--llm-url", url, "--llm-model", "m", "--clip-model", "uniil-tiny",
            "--concurrency", str(concurrency)]
    probe = ("import sys; from uniil.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             f"print('HEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules) or '-', file=sys.stderr)")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if "HEAVY" not in proc.stderr or "up to date" not in proc.stdout:
            raise SystemExit(f"rerun failed:\n{proc.stdout}\n{proc.stderr}")
    return {"seconds": sorted(times)[1], "heavy": proc.stderr.split("HEAVY", 1)[1].strip()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        url, pool, classes_file, out = args.child
        return child_build(url, Path(pool), Path(classes_file), args.concurrency, Path(out))

    with tempfile.TemporaryDirectory() as tmp, loopback_server_process(0.0) as (url, server):
        tmp = Path(tmp)
        classes_file = tmp / "classes.txt"
        classes_file.write_text("\n".join(class_names(args.classes)) + "\n", encoding="utf-8")
        pool, out = tmp / "scale.duckdb", tmp / "child.json"
        s0 = process_cpu_s(server.pid)
        subprocess.run([sys.executable, __file__, "--concurrency", str(args.concurrency),
                        "--child", url, str(pool), str(classes_file), str(out)], check=True)
        server_cpu = process_cpu_s(server.pid) - s0
        served = requests_served(url)
        r = json.loads(out.read_text())
        again = rerun(url, pool, classes_file, args.concurrency)
        served_by_rerun = requests_served(url) - served
    w, c = r["wall"], r["cpu"]
    asking_w, asking_c = w["requests"], c["requests"]
    parts = {"planning (prompts and keys)": w.get("planning", 0), "request rows (bulk insert)": w.get("request_rows", 0),
             "asking (recording overlapped)": asking_w, "dedupe: MiniLM embedding": w.get("dedupe", 0),
             "dedupe: merge": w.get("merge", 0), "embedding (CLIP text)": w.get("embed", 0),
             "indexing (FAISS)": w.get("indexing", 0), "derived tables (bulk insert)": w.get("derived_tables", 0),
             "checkpoint and rename": w.get("checkpoint", 0)}
    other = r["total_wall"] - sum(parts.values())
    print(f"{args.classes} classes x 3 templates: {served} requests, {r['answered']} answered, "
          f"{r['raw_attributes']} raw / {r['attributes']} canonical attributes; --concurrency {args.concurrency}")
    print(f"total {r['total_wall']:.1f} s wall, {r['total_cpu']:.1f} s CPU; peak RSS {r['peak_rss_mb']:.0f} MB")
    for name, s in parts.items():
        print(f"  {name:32s} {s:7.2f} s")
    print(f"  {'other (open, stats, meta)':32s} {other:7.2f} s")
    slowest = max(parts, key=parts.get)
    print(f"slowest part: {slowest} ({parts[slowest]:.1f} s)")
    print(f"asking: {served / asking_w:.0f} requests/s; client CPU {asking_c:.1f} s = "
          f"{asking_c / served * 1000:.2f} ms/request (target <= 1.5; asking + recording target <= 60 s); "
          f"server CPU {server_cpu / served * 1000:.2f} ms/request")
    print(f"recording: {w['recording_calls']:.0f} commits, {served / w['recording_calls']:.1f} calls each, "
          f"{c['recording']:.1f} s writer-thread CPU ({c['recording'] / served * 1000:.2f} ms/call)")
    print(f"finished rerun: {again['seconds']:.2f} s (median of 3, target <= 1.5 s), {served_by_rerun} requests, "
          f"heavy modules imported: {again['heavy']}")


if __name__ == "__main__":
    main()
