"""A run directory: its config, per-step checkpoints (safetensors + JSON, nothing pickled) and
metrics.json, each written atomically. SIGINT is held back while a file is written, so Ctrl-C
never leaves half a checkpoint; the interrupt is delivered as soon as the write is done."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path

from ..common import atomic_path, atomic_write_text
from ..errors import UserError
from .records import METRICS_FILE, MetricsRecord

CONFIG = "config.json"
METRICS = METRICS_FILE
STATE_DIR = "checkpoints"


@contextlib.contextmanager
def interrupts_deferred():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def _json_text(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False)


def write_json(path: Path, obj) -> None:
    with interrupts_deferred():
        atomic_write_text(path, _json_text(obj))


def read_json(path: Path) -> dict:
    """A JSON object from the run directory; anything else is a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc.__class__.__name__}); the run directory is damaged: "
                        "start a new --out directory") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; the run directory is damaged: start a new --out directory")
    return data


def step_paths(run_dir: Path, t: int) -> tuple[Path, Path]:
    d = run_dir / STATE_DIR
    return d / f"step-{t + 1:03d}.safetensors", d / f"step-{t + 1:03d}.json"


def save_step(run_dir: Path, t: int, tensors: dict, extra: dict, metrics: dict | None = None) -> None:
    """Step t's checkpoint, then `metrics` (the record counting step t) as metrics.json, in one
    stretch Ctrl-C cannot split: a resumed run starts after the steps metrics.json counts, so a
    checkpoint it did not count would be trained again."""
    from safetensors.torch import save_file

    weights, meta = step_paths(run_dir, t)
    with interrupts_deferred():
        with atomic_path(weights) as tmp:
            save_file(tensors, str(tmp))
        atomic_write_text(meta, json.dumps(extra))
        if metrics is not None:
            atomic_write_text(run_dir / METRICS, _json_text(metrics))


def load_step(run_dir: Path, t: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    weights, meta = step_paths(run_dir, t)
    if not weights.exists() or not meta.exists():
        raise UserError(f"{run_dir} records step {t + 1} as finished but its checkpoint is missing; "
                        "start a new --out directory")
    return load_file(str(weights)), read_json(meta)


def check_resume(run_dir: Path, identity: dict, resume: bool) -> MetricsRecord | None:
    """The metrics record to continue from (None: a fresh run). Refuses to mix two runs' results."""
    config_path, metrics_path = run_dir / CONFIG, run_dir / METRICS
    if not config_path.exists():
        if resume and run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"{run_dir} is not a uniil run directory (no {CONFIG}); nothing to resume")
        return None
    if not resume:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    stored = read_json(config_path).get("identity", {})
    differ = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
    if differ:
        shown = ", ".join(f"{k} ({stored.get(k)!r} -> {identity.get(k)!r})" for k in differ[:3])
        raise UserError(f"--resume: {run_dir} holds a run with a different config: {shown}; "
                        "use the same options, or another --out")
    return MetricsRecord.load(metrics_path) if metrics_path.exists() else None
