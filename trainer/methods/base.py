"""The contract every continual-learning method follows, and the registry that names them.

As in Mammoth, a method is one file: a `ContinualMethod` subclass decorated with
`@register_method("name")`. The engine owns the loop, the data, the optimiser, precision, DDP,
evaluation and checkpoints; a method says what to train and how to classify:

    begin_step(t, step)        structural set-up for step t (new routers, ...); must be cheap and
                               deterministic, because a resumed run replays it for finished steps
    forward(batch)             the training loss of one batch (a scalar tensor)
    end_step(t, step, data)    after training step t (freeze experts, fit statistics, fuse, ...)
    encode(batch)              L2-normalised image features used for classification
    logits(features, classes)  scores over global class indices (default: 100 * f . t_c)

State that must survive a checkpoint is the method's parameters and buffers (saved as safetensors,
never pickled) plus the JSON-serialisable dict of `extra_state()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...errors import UserError

METHODS: dict[str, type["ContinualMethod"]] = {}


def register_method(name: str):
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


def known_methods() -> list[str]:
    from . import calfuse, finetune, mage, moe_adapters, zeroshot  # noqa: F401  (the built-in methods register on import)

    return sorted(METHODS)


def method_class(name: str) -> type["ContinualMethod"]:
    known = known_methods()
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; known: {', '.join(known)}")
    return METHODS[name]


def option(options: dict, key: str, default, kind=None, choices: tuple[str, ...] | None = None):
    """options[key] (or `default`) as the type of `default` (or `kind`), or one of `choices`;
    anything else is a one-line user error. Every method reads its `--opt` values through this."""
    value = options.get(key)
    if value is None:
        value = default
    if choices is not None:
        if value not in choices:
            raise UserError(f"--opt {key}={value!r}: use one of {', '.join(choices)}")
        return value
    kind = kind or type(default)
    if kind is bool:
        text = str(value).lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"--opt {key}={value}: write true or false")
        return text in ("true", "1", "yes")
    if kind in (int, float):
        wanted = "a whole number" if kind is int else "a number"
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (kind is int and not number.is_integer()):
            raise UserError(f"--opt {key}={value!r}: expected {wanted}")
        return kind(number)
    return kind(value)


def fraction(options: dict, key: str, default: float) -> float:
    """An option that is a quantile or fraction: a float in [0, 1]."""
    value = option(options, key, default, float)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--opt {key}={value}: must be between 0 and 1 (e.g. 0.05 for 5%)")
    return value


@dataclass
class Batch:
    """A training or evaluation batch. `index` are the images' positions in `source`, so a method
    can look up per-image cached data (attribute matches, frozen features)."""

    images: torch.Tensor | None  # [B, 3, H, W], preprocessed; None when the method works on features
    targets: torch.Tensor  # [B] global class indices
    index: torch.Tensor  # [B] positions in the source
    source: object = None
    features: torch.Tensor | None = None  # frozen CLIP features, for methods with `uses_frozen_features`


@dataclass
class StepData:
    """What a method may know about a step: its classes as global indices and its training data."""

    index: int
    step: object  # scenario.Step
    classes: torch.Tensor  # global class indices of the step (training vocabulary)
    seen_classes: torch.Tensor  # global class indices of every step <= this one
    train_source: object = None
    extra: dict = field(default_factory=dict)


# Keys the engine puts into a method's options itself (not `--opt` options).
ENGINE_KEYS = frozenset({"pool", "class_names", "templates", "data"})


class ContinualMethod(nn.Module):
    name: ClassVar[str] = ""
    option_keys: ClassVar[frozenset[str]] = frozenset()  # the `--opt` keys the method reads
    trains: ClassVar[bool] = True  # False: no optimisation (zeroshot)
    uses_frozen_features: ClassVar[bool] = False  # True: batches carry cached frozen features, not images
    default_templates: ClassVar[tuple[str, ...]] = ("a photo of a {}.",)

    def __init__(self, clip, text: torch.Tensor, options: dict):
        """`clip` is a loaded backbone (frozen); `text` [C, D] the class text embeddings t_c of
        every class of the scenario, in global class order."""
        super().__init__()
        self.clip = clip
        self.register_buffer("text", text, persistent=False)
        self.options = dict(options)

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Refuse `--opt` keys the method does not read: a typo must not pass silently."""
        unknown = sorted(set(options) - cls.option_keys - ENGINE_KEYS)
        if unknown:
            known = ", ".join(sorted(cls.option_keys)) or "none"
            raise UserError(f"{cls.name}: unknown option(s) {', '.join(unknown)}; known: {known}")

    # -- the contract ---------------------------------------------------------------------------
    def begin_step(self, t: int, data: StepData) -> None:
        pass

    def forward(self, batch: Batch, data: StepData) -> torch.Tensor:
        """The training loss: cross-entropy over the step's vocabulary by default."""
        return self.classification_loss(self.encode(batch), batch, data)

    def classification_loss(self, features: torch.Tensor, batch: Batch, data: StepData) -> torch.Tensor:
        """Cross-entropy of `logits` over the step's classes (option `label_smoothing`)."""
        return nn.functional.cross_entropy(self.logits(features, data.classes), self.positions(batch.targets, data.classes),
                                           label_smoothing=option(self.options, "label_smoothing", 0.0))

    def positions(self, targets: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Global class indices -> positions within `classes`. The look-up table is built once per
        vocabulary tensor (a step's), not per batch: building it reads classes.max() on the host."""
        cached = self.__dict__.get("_position_table")
        if cached is None or cached[0] is not classes:
            cached = (classes, _positions(torch.arange(int(classes.max()) + 1, device=classes.device), classes))
            self.__dict__["_position_table"] = cached
        return cached[1][targets]

    def end_step(self, t: int, data: StepData) -> None:
        pass

    def encode(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return 100.0 * features @ self.text[classes].to(features.dtype).T

    # -- checkpoint state -----------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the method owns (parameters and buffers). The backbone is not a submodule
        of the method, so its frozen weights never enter a checkpoint."""
        state = {}
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if name == "text":  # derived from the backbone and the scenario
                continue
            state[name] = tensor.detach().cpu().contiguous().clone()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state()
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise UserError(f"checkpoint does not fit method {self.name} (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}); start a new --out directory")
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        with torch.no_grad():
            for name, value in state.items():
                tensors[name].copy_(value.to(tensors[name].device, tensors[name].dtype))

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def statistics(self) -> dict:
        """Per-step figures the run records (e.g. expert usage); JSON-serialisable."""
        return {}


def _positions(targets: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Global class indices -> positions within `classes` (every target must be in it)."""
    lookup = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long, device=classes.device)
    lookup[classes] = torch.arange(len(classes), device=classes.device)
    return lookup[targets]
