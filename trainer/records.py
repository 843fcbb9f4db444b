"""The metrics record of a run (`RUN_DIR/metrics.json`), typed once.

The engine fills it step by step, the report and `uniil train`'s summary read it, and the tests
check it, all through these classes, so a key is spelled in one place. The JSON layout is the
one every earlier run wrote (class-IL metrics at the top level, task-IL under "task_il"), so old
run directories still load and resume. Metric definitions: docs/methods.md#metrics.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import metrics as M

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
METRIC_KEYS = ("last", "avg", "avg_incremental", "transfer", "forgetting", "bwt")


class MalformedRecord(Exception):
    """metrics.json does not follow the schema; the message says where."""


@dataclass(frozen=True)
class StepInfo:
    dataset: str
    domain: str
    kind: str
    classes: tuple[str, ...]

    def label(self, index: int, with_dataset: bool = False) -> str:
        """Axis label of step `index` (0-based), e.g. "2 class / sketch"."""
        where = f"{self.dataset}:{self.domain}" if with_dataset else self.domain
        return f"{index + 1} {self.kind} / {where}"

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "domain": self.domain, "kind": self.kind, "classes": list(self.classes)}


@dataclass
class Metrics:
    """One accuracy matrix (percent; the finished rows; NaN where an entry is missing on load) and
    its metrics, which stay None until every step is trained."""

    accuracy_matrix: list[list[float]] = field(default_factory=list)
    last: float | None = None
    avg: float | None = None
    avg_incremental: float | None = None
    transfer: float | None = None
    forgetting: float | None = None
    bwt: float | None = None

    def summarise(self, total_steps: int, test_sizes: list[int] | None) -> None:
        done = len(self.accuracy_matrix) == total_steps
        summary = M.summarize(self.accuracy_matrix, test_sizes) if done else {}
        for key in METRIC_KEYS:
            setattr(self, key, summary.get(key))

    def to_json(self) -> dict:
        rows = [[None if math.isnan(x) else x for x in row] for row in self.accuracy_matrix]  # JSON has no NaN
        return {"accuracy_matrix": rows, **{k: getattr(self, k) for k in METRIC_KEYS}}


@dataclass
class Timings:
    train_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    images_per_s: list[float | None] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"train_s": self.train_s, "eval_s": self.eval_s, "images_per_s": self.images_per_s}


@dataclass
class MetricsRecord:
    scenario: str
    method: str
    backbone: str
    seed: int | None
    steps: list[StepInfo]
    class_il: Metrics = field(default_factory=Metrics)
    task_il: Metrics | None = None  # scenarios with several datasets
    test_sizes: list[int] | None = None
    finished_steps: int = 0
    timings: Timings = field(default_factory=Timings)
    statistics: list[dict] = field(default_factory=list)  # per step, method-specific
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @property
    def partial(self) -> bool:
        return self.finished_steps < self.total_steps

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(s.dataset for s in self.steps))

    def add_step(self, row: list[float], task_row: list[float] | None, test_sizes: list[int], train_s: float,
                 eval_s: float, images_per_s: float | None, statistics: dict) -> None:
        """Record one finished step (row j of the matrices) and recompute the metrics."""
        self.test_sizes = test_sizes
        self.class_il.accuracy_matrix.append(row)
        if task_row is not None:
            self.task_il = self.task_il or Metrics()
            self.task_il.accuracy_matrix.append(task_row)
        self.timings.train_s.append(round(train_s, 3))
        self.timings.eval_s.append(round(eval_s, 3))
        self.timings.images_per_s.append(images_per_s)
        self.statistics.append(statistics)
        self.finished_steps += 1
        for m in (self.class_il, self.task_il):
            if m is not None:
                m.summarise(self.total_steps, self.test_sizes)

    def to_json(self) -> dict:
        return {"scenario": self.scenario, "method": self.method, "backbone": self.backbone, "seed": self.seed,
                "steps": [s.to_json() for s in self.steps], "test_sizes": self.test_sizes,
                **self.class_il.to_json(), "task_il": self.task_il.to_json() if self.task_il else None,
                "finished_steps": self.finished_steps, "timings": self.timings.to_json(),
                "statistics": self.statistics, "config": self.config, "versions": self.versions}

    @classmethod
    def from_json(cls, data) -> "MetricsRecord":
        """Parse and validate; raises MalformedRecord naming the offending key."""
        if not isinstance(data, dict):
            raise MalformedRecord("the top level is not an object")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise MalformedRecord("'steps' is missing or empty")
        steps = []
        for k, s in enumerate(raw_steps):
            if not isinstance(s, dict):
                raise MalformedRecord(f"steps[{k}] is not an object")
            steps.append(StepInfo(str(s.get("dataset", "?")), str(s.get("domain", "?")), str(s.get("kind", "?")),
                                  tuple(str(c) for c in s.get("classes") or ())))
        total = len(steps)
        sizes = data.get("test_sizes")
        if sizes is not None and not isinstance(sizes, list):
            raise MalformedRecord("'test_sizes' is not a list")
        class_il = _metrics(data, total, "")
        task_il = None if data.get("task_il") is None else _metrics(data["task_il"], total, "task_il.")
        rows = len(class_il.accuracy_matrix)
        finished = data.get("finished_steps", rows)
        if isinstance(finished, bool) or not isinstance(finished, int) or not 0 <= finished <= total:
            raise MalformedRecord(f"'finished_steps' must be an integer in 0..{total}")
        if finished != rows:
            log.warning("finished_steps is %d but the accuracy matrix has %d rows; using %d",
                        finished, rows, min(finished, rows))
            finished = min(finished, rows)
        seed = data.get("seed")
        timings = data.get("timings") if isinstance(data.get("timings"), dict) else {}
        stats = data.get("statistics")
        return cls(scenario=str(data.get("scenario", "?")), method=str(data.get("method", "?")),
                   backbone=str(data.get("backbone", "?")), seed=seed if isinstance(seed, int) else None,
                   steps=steps, class_il=class_il, task_il=task_il,
                   test_sizes=None if sizes is None else [int(n) for n in sizes], finished_steps=finished,
                   timings=Timings(*(list(timings.get(k) or []) for k in ("train_s", "eval_s", "images_per_s"))),
                   statistics=stats if isinstance(stats, list) else [],
                   config=data.get("config") if isinstance(data.get("config"), dict) else {},
                   versions=data.get("versions") if isinstance(data.get("versions"), dict) else {})

    @classmethod
    def load(cls, path: Path) -> "MetricsRecord":
        """Read a metrics.json; a corrupt or malformed file is a one-line UserError."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is corrupt ({exc.__class__.__name__}: {exc}); rerun `uniil train`") from None
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_json(data)
        except (MalformedRecord, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not a valid uniil metrics file ({exc}); rerun `uniil train`") from None


def _num(v, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MalformedRecord(f"{what} is not a number")
    v = float(v)
    return None if math.isnan(v) else v


def _matrix(raw, total: int, what: str) -> list[list[float]]:
    if not isinstance(raw, list) or len(raw) > total:
        raise MalformedRecord(f"{what} must be a list of at most {total} rows")
    rows = []
    for j, row in enumerate(raw):
        if not isinstance(row, list) or len(row) != total:
            raise MalformedRecord(f"{what} row {j} must have {total} entries")
        rows.append([math.nan if (x := _num(v, f"{what}[{j}][{i}]")) is None else x for i, v in enumerate(row)])
    return rows


def _metrics(raw: dict, total: int, what: str) -> Metrics:
    if not isinstance(raw, dict):
        raise MalformedRecord(f"{what} is not an object")
    return Metrics(_matrix(raw.get("accuracy_matrix", []), total, f"{what}accuracy_matrix"),
                   **{k: _num(raw.get(k), f"{what}{k}") for k in METRIC_KEYS})
