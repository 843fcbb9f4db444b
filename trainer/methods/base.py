"""The contract every continual-learning method follows.

As in Mammoth, a method is one file in trainer/methods/ (or a module an installed package names
under the entry-point group `uniil.methods`, see registry.py): a `ContinualMethod` subclass
decorated with `@register_method("name")`. The engine owns the loop, the data, the optimiser,
precision, DDP, evaluation and checkpoints; a method says what to train and how to classify.

Declared on the class:

    Options           a frozen dataclass of the method's `--opt` options, each field declared with
                      options.opt(default, help, ...); subclass ContinualMethod.Options (or the
                      parent method's). An optional `check(self)` relates several options.
    presets           {preset name: {option: value}}; with presets the Options declare `preset`,
                      whose bundle applies before the explicit options
    needs_pool        True: the engine refuses to start without `--pool` (`requires_pool` may
                      decide from the options instead)
    trains            False: no optimisation (zeroshot)
    uses_frozen_features  True: batches carry cached frozen CLIP features instead of images

Called by the engine:

    Method(clip, text, opts, context)   clip: the loaded, frozen backbone; text [C, D]: the class
                               text embeddings t_c of every class of the scenario, in global class
                               order; opts: an Options instance (a mapping is parsed into one);
                               context: the RunContext
    begin_step(t, data)        structural set-up for step t (new routers, ...); must be cheap and
                               deterministic, because a resumed run replays it for finished steps
    forward(batch, data)       the training loss of one batch (a scalar tensor)
    learning_rate(data, lr)    the peak learning rate of step `data` given the run's --lr (default: lr)
    end_step(t, data)          after training step t (freeze experts, fit statistics, fuse, ...)
    encode(batch)              L2-normalised image features used for classification (a method may
                               append columns that only its own `logits` reads)
    logits(features, classes)  scores over global class indices (default: 100 * f . t_c)
    statistics()               per-step figures the run records (JSON-serialisable)

State that must survive a checkpoint is the method's parameters and buffers (saved as safetensors,
never pickled) plus the JSON-serialisable dict of `extra_state()`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ...errors import UserError
from ...typed_options import opt, options_json, parse_options
from .registry import METHODS, known_methods, method_class, register_method

if TYPE_CHECKING:
    from ..sources import DataOptions

__all__ = ["METHODS", "Batch", "ContinualMethod", "RunContext", "StepData", "known_methods", "method_class", "opt",
           "register_method", "templates_option"]


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


@dataclass(frozen=True)
class RunContext:
    """What the run gives a method besides its options: set by the engine, never by `--opt`."""

    pool: object = None  # attrpool.match.PoolAttributes of `--pool`, or None
    class_names: tuple[str, ...] = ()  # every class of the scenario, in global class order
    class_datasets: tuple[str, ...] = ()  # the dataset of each class, in the same order
    templates: tuple[str, ...] = ()  # the prompt templates the class text embeddings were made with
    data: DataOptions | None = None  # --data-root, --download, synthetic sizes
    device: torch.device | None = None


def _templates_problem(value: str) -> str | None:
    if not all("{}" in t for t in value.split("|")):
        return "every template needs {} where the class name goes (templates are separated by |)"
    return None


def templates_option(default: str = "a photo of a {}."):
    """The `templates` option; a method whose paper prompts otherwise redeclares it with its default."""
    return opt(default, "prompt template(s) of the class text embeddings t_c, separated by |; {} is the class name",
               separator="|", check=_templates_problem)


def label_smoothing_option():
    """The `label_smoothing` option of a method trained with cross-entropy."""
    return opt(0.0, "label smoothing of the cross-entropy", fraction=True)


def train_vocab_option(default: str = "step"):
    """The `train_vocab` option of a method trained with `classification_loss`."""
    return opt(default, "classes the training cross-entropy ranges over: the step's own (as MoE-Adapters' code "
                        "trains), or every class seen so far (the class-IL test vocabulary: old classes' text "
                        "embeddings are negatives, so new images are not left nearest to an old class)",
               choices=("step", "seen"))


class ContinualMethod(nn.Module):
    """A continual-learning method (see the module docstring for the contract)."""

    @dataclass(frozen=True)
    class Options:
        """Options every method has."""

        templates: str = templates_option()

    name: ClassVar[str] = ""  # set by @register_method
    presets: ClassVar[dict[str, dict]] = {}
    needs_pool: ClassVar[bool] = False  # True: `--pool` is required (the engine checks it)
    trains: ClassVar[bool] = True  # False: no optimisation (zeroshot)
    uses_frozen_features: ClassVar[bool] = False  # True: batches carry cached frozen features, not images

    def __init__(self, clip, text: torch.Tensor, opts=None, context: RunContext | None = None):
        super().__init__()
        self.clip = clip
        self.register_buffer("text", text, persistent=False)
        self.opts = opts if type(opts) is self.Options else self.parse_options(opts)
        self.context = context if context is not None else RunContext()

    @classmethod
    def parse_options(cls, raw: Mapping | None):
        """`--opt` values (text or typed) -> the method's Options; a one-line UserError otherwise."""
        if raw is not None and not isinstance(raw, Mapping):
            raise TypeError(f"{cls.name} options: a {cls.__name__}.Options or a mapping, not {type(raw).__name__}")
        return parse_options(cls.name or cls.__name__, cls.Options, raw, cls.presets)

    @classmethod
    def options_record(cls, raw: Mapping | None) -> dict:
        """The resolved, typed options as JSON (what a run's config records)."""
        return options_json(cls.parse_options(raw))

    @classmethod
    def requires_pool(cls, opts) -> bool:
        """Whether a run with these options needs `--pool`; `needs_pool` unless a method knows better."""
        return cls.needs_pool

    @classmethod
    def pool_need(cls) -> str:
        """For `uniil methods show`: "always", "never" or "with some options" (a method that
        overrides `requires_pool`)."""
        if cls.needs_pool:
            return "always"
        overridden = cls.requires_pool.__func__ is not ContinualMethod.requires_pool.__func__
        return "with some options" if overridden else "never"

    @classmethod
    def description(cls) -> str:
        """One line for `uniil methods`: the first line of the class's (or its module's) docstring."""
        doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
        return doc.strip().splitlines()[0].strip() if doc.strip() else ""

    # -- the contract ---------------------------------------------------------------------------
    def begin_step(self, t: int, data: StepData) -> None:
        pass

    def forward(self, batch: Batch, data: StepData) -> torch.Tensor:
        """The training loss: cross-entropy over the step's vocabulary by default."""
        return self.classification_loss(self.encode(batch), batch, data)

    def classification_loss(self, features: torch.Tensor, batch: Batch, data: StepData,
                            label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy of `logits` over the step's classes, or over every class seen so far when
        the method's `train_vocab` option (`train_vocab_option()`) says "seen". A method with a
        `label_smoothing` option, declared with `label_smoothing_option()`, passes it."""
        vocab = data.seen_classes if getattr(self.opts, "train_vocab", "step") == "seen" else data.classes
        return nn.functional.cross_entropy(self.logits(features, vocab), self.positions(batch.targets, vocab),
                                           label_smoothing=label_smoothing)

    def positions(self, targets: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Global class indices -> positions within `classes`. The look-up table is built once per
        vocabulary tensor (a step's), not per batch: building it reads classes.max() on the host."""
        cached = self.__dict__.get("_position_table")
        if cached is None or cached[0] is not classes:
            cached = (classes, _positions(torch.arange(int(classes.max()) + 1, device=classes.device), classes))
            self.__dict__["_position_table"] = cached
        return cached[1][targets]

    def learning_rate(self, data: StepData, lr: float) -> float:
        return lr

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
        # Non-persistent buffers (the class texts `text`, tokenised prompts) derive from the backbone
        # and the scenario: the state dict leaves them out.
        return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in self.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state()
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise UserError(f"checkpoint does not fit method {self.name} (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}); start a new --out directory")
        tensors = dict(self.named_parameters(remove_duplicate=False)) | dict(self.named_buffers(remove_duplicate=False))
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
