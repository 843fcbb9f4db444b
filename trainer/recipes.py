"""Recipes: per-scenario training defaults and each method's chosen hyperparameters, as files.

A recipe is what Mammoth's best-args files are: the values a method is run with on a scenario,
chosen on a validation split (`uniil sweep` writes them) and saying how. `uniil train` and
`uniil bench` take their defaults from the scenario's recipe; a flag or `--opt` given on the
command line always wins. Presets ship theirs in data/recipes/<scenario>.yaml.

    scenario: synthetic-uniil
    about: how the values were chosen (free text)
    defaults:            # engine settings of every method: the scenario's training budget
      epochs: 2
      train_per_class: 100
    options:             # --opt values of every method (each method must declare them)
      templates: "a photo of a {}."
    methods:
      finetune:
        lr: 0.001
        options: {}
        chosen: "lr from 0.0003, 0.001, 0.003 on validation Last (seed 0): 61.2, 65.0, 63.1"

A key the file does not know (at the top, in `defaults`, for a method, or a method option) is a
one-line error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.registry import DATA_DIR
from ..errors import UserError

RECIPE_DIR = DATA_DIR / "recipes"
# `defaults` keys -> TrainConfig fields (the flags' names, as users write them).
DEFAULT_FIELDS = {"epochs": "epochs", "iters": "iters", "batch_size": "batch_size", "lr": "lr",
                  "weight_decay": "weight_decay", "warmup": "warmup", "precision": "precision",
                  "train_per_class": "synthetic_train_per_class", "test_per_class": "synthetic_test_per_class"}
TOP_KEYS = ("scenario", "about", "command", "backbone", "defaults", "options", "methods", "candidates")
METHOD_KEYS = ("lr", "options", "chosen")


@dataclass(frozen=True)
class MethodRecipe:
    lr: float | None = None
    options: dict = field(default_factory=dict)  # as written (the method's parser types them)
    chosen: str = ""  # how the values were chosen


@dataclass(frozen=True)
class Recipe:
    path: Path
    scenario: str
    defaults: dict = field(default_factory=dict)  # TrainConfig field -> value
    options: dict = field(default_factory=dict)  # --opt values of every method
    methods: dict[str, MethodRecipe] = field(default_factory=dict)
    about: str = ""
    extra: dict = field(default_factory=dict)  # command, backbone, candidates: kept when rewritten

    def settings(self, method: str) -> dict:
        """TrainConfig fields this recipe sets for one method (its lr over the shared defaults)."""
        own = self.methods.get(method)
        return {**self.defaults, **({"lr": own.lr} if own is not None and own.lr is not None else {})}

    def method_options(self, method: str) -> dict:
        """`--opt` values for one method: the shared ones, then its own."""
        own = self.methods.get(method)
        return {**self.options, **(own.options if own is not None else {})}


def shipped(scenario_name: str) -> Path | None:
    path = RECIPE_DIR / f"{scenario_name}.yaml"
    return path if path.is_file() else None


def find_recipe(choice: str | None, scenario_name: str) -> Recipe | None:
    """--recipe: None (the scenario's shipped recipe, if any), "none" (no recipe), or a file."""
    if choice == "none":
        return None
    if choice is None:
        path = shipped(scenario_name)
        return load_recipe(path) if path is not None else None
    path = Path(choice)
    if not path.is_file():
        raise UserError(f"--recipe {choice}: no such file; give a recipe YAML file, or none")
    return load_recipe(path)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where} must be a mapping of key: value")
    return dict(value)


def load_recipe(path: Path, check_methods: bool = True) -> Recipe:
    """Read and check a recipe; every problem is one line naming the file and the key."""
    from .methods.base import method_class
    from ..typed_options import option_specs

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]
        raise UserError(f"recipe {path}: cannot read it ({why}); fix the file or pass --recipe none") from None
    where = f"recipe {path}"
    data = _mapping(data, where)
    for key in data:
        if key not in TOP_KEYS:
            raise UserError(f"{where}: unknown key '{key}'; a recipe has {', '.join(TOP_KEYS)}")
    defaults = {}
    for key, value in _mapping(data.get("defaults"), f"{where}: defaults").items():
        if key not in DEFAULT_FIELDS:
            raise UserError(f"{where}: unknown setting 'defaults.{key}'; use {', '.join(DEFAULT_FIELDS)}")
        defaults[DEFAULT_FIELDS[key]] = value
    options = _mapping(data.get("options"), f"{where}: options")
    methods: dict[str, MethodRecipe] = {}
    for name, entry in _mapping(data.get("methods"), f"{where}: methods").items():
        entry = _mapping(entry, f"{where}: methods.{name}")
        for key in entry:
            if key not in METHOD_KEYS:
                raise UserError(f"{where}: unknown key 'methods.{name}.{key}'; a method has {', '.join(METHOD_KEYS)}")
        lr = entry.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise UserError(f"{where}: methods.{name}.lr must be a positive number, not {lr!r}")
        methods[str(name)] = MethodRecipe(float(lr) if lr is not None else None,
                                          _mapping(entry.get("options"), f"{where}: methods.{name}.options"),
                                          str(entry.get("chosen") or ""))
    recipe = Recipe(Path(path), str(data.get("scenario") or ""), defaults, options, methods,
                    str(data.get("about") or ""),
                    {k: data[k] for k in ("command", "backbone", "candidates") if k in data})
    if check_methods:
        for name in methods:
            try:
                cls = method_class(name)
            except UserError:
                raise UserError(f"{where}: unknown method 'methods.{name}' (uniil methods lists them)") from None
            known = {s.name for s in option_specs(cls.Options, cls.presets)}
            for key in recipe.method_options(name):
                if key.replace("-", "_") not in known:
                    part = f"methods.{name}.options.{key}" if key in methods[name].options else f"options.{key}"
                    raise UserError(f"{where}: method {name} has no option '{part}' (its options: "
                                    f"{', '.join(sorted(known))})")
            try:
                cls.parse_options(recipe.method_options(name))
            except UserError as exc:
                raise UserError(f"{where}: methods.{name}: {exc}") from None
    return recipe


def resolve(recipe: Recipe | None, method: str, given: Mapping[str, object], options: Mapping[str, object]) -> tuple[dict, dict]:
    """(TrainConfig fields, --opt values) of one method's run: the flags and --opt values given
    (None means "not given") over the recipe's, over TrainConfig's own defaults."""
    settings = recipe.settings(method) if recipe is not None else {}
    settings.update({k: v for k, v in given.items() if v is not None})
    opts = recipe.method_options(method) if recipe is not None else {}
    opts.update(options)
    return settings, opts


def train_config(scenario: str, method: str, out: Path, recipe: Recipe | None, given: Mapping[str, object],
                 options: Mapping[str, object]):
    """A TrainConfig for `uniil train`: flags given, then the recipe, then the built-in defaults."""
    from .config import TrainConfig

    settings, opts = resolve(recipe, method, given, options)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"not TrainConfig fields: {unknown}")
    return TrainConfig(scenario, method, out, **settings, method_options=opts,
                       recipe=str(recipe.path) if recipe is not None else None)


def dump(recipe: Recipe) -> str:
    """A recipe as YAML, keys in the documented order (what `uniil sweep` writes)."""
    names = {v: k for k, v in DEFAULT_FIELDS.items()}
    data: dict = {"scenario": recipe.scenario}
    if recipe.about:
        data["about"] = recipe.about
    for k in ("command", "backbone"):
        if k in recipe.extra:
            data[k] = recipe.extra[k]
    data["defaults"] = {names[k]: v for k, v in recipe.defaults.items()}
    data["options"] = dict(recipe.options)
    data["methods"] = {name: {"lr": m.lr, "options": dict(m.options), "chosen": m.chosen}
                       for name, m in recipe.methods.items()}
    if "candidates" in recipe.extra:
        data["candidates"] = recipe.extra["candidates"]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
