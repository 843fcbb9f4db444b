"""The typed configuration of one `uniil train` run, and what makes two runs the same run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
# test: train on the training split, evaluate on the test split (results). val: train on 80% of
# each class's training images, evaluate on the other 20% (choosing hyperparameters, `uniil sweep`).
EVAL_SPLITS = ("test", "val")
# Fields that do not change results: a resumed run may differ in these. `recipe` names where the
# defaults came from; the values themselves are the other fields.
NOT_IDENTITY = {"out", "resume", "device", "recipe"}
# Fields earlier versions wrote that mean nothing now (num_workers: a --workers flag nothing read).
RETIRED = {"num_workers"}
# Fields added since runs were first recorded, with the value an older run had without saying so.
ADDED = {"eval_split": "test", "warmup_rule": "capped"}
PATHS = ("out", "pool", "data_root")
# Warm-up iterations when --warmup is not given, capped at a quarter of a step's iterations. A
# given --warmup is used as given. (Runs recorded before the cap depended on this wrote 30.)
DEFAULT_WARMUP = 30


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
    warmup: int | None = None  # None: DEFAULT_WARMUP, capped (see engine)
    # How `warmup` reads: "as-given" (a given value is used uncapped). Runs recorded before it existed
    # capped every value ("capped"), so a recorded 30 there is this version's None.
    warmup_rule: str = "as-given"
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    data_root: Path | None = None
    download: bool = False
    synthetic_train_per_class: int = 40
    synthetic_test_per_class: int = 10
    resume: bool = False
    eval_split: str = "test"
    recipe: str | None = None  # the recipe file whose values filled in what flags did not give
    # `--opt` options: as given (text or typed values) until the engine resolves them; a run's
    # config.json records the resolved, typed options of the method (every declared field).
    method_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision}; use {', '.join(PRECISIONS)}")
        if self.eval_split not in EVAL_SPLITS:
            raise UserError(f"unknown --eval-split {self.eval_split}; use {', '.join(EVAL_SPLITS)}")
        flags = {"epochs": "--epochs", "batch_size": "--batch-size", "synthetic_train_per_class": "--train-per-class",
                 "synthetic_test_per_class": "--test-per-class"}
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise UserError(f"{flag} must be at least 1")
        if self.iters is not None and self.iters < 1:
            raise UserError("--iters must be at least 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if self.warmup is not None and self.warmup < 0:
            raise UserError("--warmup must be 0 or more")

    def as_json(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        """A config as `as_json` wrote it, this version's or an earlier one's (retired fields are dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - RETIRED)
        if unknown:
            raise UserError(f"run config has unknown setting(s) {', '.join(unknown)}: written by a newer uniil?")
        values = {k: v for k, v in data.items() if k in known}
        for k in PATHS:
            if values.get(k) is not None:
                values[k] = Path(values[k])
        return cls(**values)

    def identity(self) -> dict:
        """The settings that determine a run's results (compared on --resume)."""
        return {k: v for k, v in self.as_json().items() if k not in NOT_IDENTITY}

    def identity_against(self, stored: dict, resolve: Callable[[dict], dict], version: Callable[[], str]) -> dict:
        """`identity()`, to compare with a stored one. Earlier versions recorded method options as
        given (text, or only some keys): those count as ours when `resolve` (the method's typed
        parser) turns them into the same resolved options. Options it cannot read are refused
        naming the version (`version()`) that wrote them."""
        identity = self.identity()
        for k, before in ADDED.items():
            if k not in stored and identity.get(k) == before:
                del identity[k]
        if "warmup_rule" not in stored and stored.get("warmup") == DEFAULT_WARMUP and identity.get("warmup") is None:
            identity["warmup"] = DEFAULT_WARMUP  # the capped default, as earlier versions recorded it
            identity.pop("warmup_rule", None)
        theirs = stored.get("method_options")
        if stored.get("method") != self.method or not isinstance(theirs, dict) or theirs == identity["method_options"]:
            return identity  # another method, or the same record: the plain comparison says it all
        try:
            resolved = resolve(theirs)
        except UserError as exc:
            raise UserError(f"--resume: {self.out} was written by {version()} with method options this "
                            f"version cannot read ({exc}); start a new --out directory") from None
        if resolved == identity["method_options"]:
            identity["method_options"] = theirs
        return identity
