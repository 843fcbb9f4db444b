"""The typed configuration of one `uniil train` run, and what makes two runs the same run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
# Fields that do not change results: a resumed run may differ in these.
NOT_IDENTITY = {"out", "resume", "device", "num_workers"}


@dataclass
class TrainConfig:
    scenario: str
    method: str
    out: Path
    pool: Path | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    epochs: int = 1
    iters: int | None = None  # optimiser steps per scenario step; overrides epochs
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 30
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    data_root: Path | None = None
    download: bool = False
    synthetic_train_per_class: int = 40
    synthetic_test_per_class: int = 10
    num_workers: int = 0
    resume: bool = False
    method_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision}; use {', '.join(PRECISIONS)}")
        for name in ("epochs", "batch_size", "synthetic_train_per_class", "synthetic_test_per_class"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.iters is not None and self.iters < 1:
            raise UserError("--iters must be at least 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")

    def as_json(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d

    def identity(self) -> dict:
        """The settings that determine a run's results (compared on --resume)."""
        return {k: v for k, v in self.as_json().items() if k not in NOT_IDENTITY}
