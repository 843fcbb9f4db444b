"""Methods as plugins: a file dropped into trainer/methods/ and an installed package's entry point
(group `uniil.methods`) are found and trained without editing anything else; each method's typed
options drive parsing, validation, presets, the run's record and `uniil methods [show NAME]`;
runs recorded before typed options still resume."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from conftest import run_cli, run_metrics, run_uniil_process
from uniil.errors import UserError
from uniil.trainer.config import TrainConfig
from uniil.trainer.methods import METHODS, known_methods, method_class

SHORT = "steps:\n  - {dataset: synthetic, classes: '0-4', domain: photo}\n" \
        "  - {dataset: synthetic, classes: '4-8', domain: photo}\n"
FAST = ["--clip-model", "uniil-tiny", "--train-per-class", "4", "--test-per-class", "2", "--batch-size", "16",
        "--iters", "2"]

# A method as a user would write it: one file, relative imports of the package it is dropped into.
DROPPED = '''
"""A linear map on frozen CLIP features: a method dropped into trainer/methods/."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Batch, ContinualMethod, opt, register_method


@register_method("probe-test")
class Probe(ContinualMethod):
    """A linear map on frozen features (test plugin)."""

    @dataclass(frozen=True)
    class Options(ContinualMethod.Options):
        preset: str = opt("residual", "a bundle of option values")
        residual: bool = opt(True, "add the frozen feature back to the mapped one")
        init_scale: float = opt(0.0, "std of the initial perturbation of the map", minimum=0)
        label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy", fraction=True)

    presets = {"residual": {"residual": True}, "plain": {"residual": False, "label_smoothing": 0.1}}
    uses_frozen_features = True

    def __init__(self, clip, text, opts=None, context=None):
        super().__init__(clip, text, opts, context)
        d = text.shape[1]
        self.map = nn.Parameter(torch.eye(d) + self.opts.init_scale * torch.randn(d, d))

    def encode(self, batch: Batch) -> torch.Tensor:
        f = batch.features.to(self.map.device).float()
        g = f @ self.map.T + (f if self.opts.residual else 0.0)
        return torch.nn.functional.normalize(g, dim=-1)

    def statistics(self) -> dict:
        return {"classes_known": len(self.context.class_names), "residual": self.opts.residual}
'''

# An installed package's method: a plain class (no decorator), named by its entry point.
INSTALLED = '''
"""An installed method plugin."""

from dataclasses import dataclass

import torch

from uniil.trainer.methods import ContinualMethod, opt


class FrozenScaled(ContinualMethod):
    """Frozen CLIP features, no training (installed test plugin)."""

    @dataclass(frozen=True)
    class Options(ContinualMethod.Options):
        scale: float = opt(1.0, "multiplies the logits", positive=True)

    trains = False
    uses_frozen_features = True

    def encode(self, batch):
        return batch.features.float()

    def logits(self, features, classes):
        return self.opts.scale * super().logits(features, classes)
'''


@pytest.fixture
def scenario(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(SHORT)
    return path


def _forget(name: str, module: str) -> None:
    METHODS.pop(name, None)
    sys.modules.pop(module, None)


@pytest.fixture
def methods_folder(tmp_path, monkeypatch):
    """A second folder of the methods package: a file written here is a file dropped into
    trainer/methods/ (same package, same discovery), without touching the source tree."""
    import uniil.trainer.methods as package

    folder = tmp_path / "methods"
    folder.mkdir()
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    importlib.invalidate_caches()
    yield folder
    _forget("probe-test", "uniil.trainer.methods.probe_test")
    sys.modules.pop("uniil.trainer.methods.broken_test", None)


def _install(root, dist: str, module: str | None, source: str | None, entry_points: str) -> None:
    """A distribution as pip leaves it: NAME.dist-info/{METADATA,entry_points.txt} beside the code."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[uniil.methods]\n{entry_points}\n")
    if module:
        (root / f"{module}.py").write_text(source)


# -- discovery ------------------------------------------------------------------------------------
def test_a_file_dropped_into_the_methods_package_trains_through_uniil_train(methods_folder, scenario, tmp_path,
                                                                           cache_dir):
    (methods_folder / "probe_test.py").write_text(DROPPED)
    assert "probe-test" in known_methods()
    run = tmp_path / "run"
    res = run_cli("train", "--scenario", scenario, *FAST, "--method", "probe-test", "--opt", "init_scale=0.01",
                  "--out", run)
    assert res.code == 0, res.err
    metrics = run_metrics(run)
    assert metrics.finished_steps == 2 and metrics.class_il.last is not None
    assert metrics.statistics[-1] == {"classes_known": 8, "residual": True}
    # the run records the resolved, typed options: every declared field, the preset's bundle applied
    recorded = json.loads((run / "config.json").read_text())["config"]["method_options"]
    assert recorded == {"templates": "a photo of a {}.", "preset": "residual", "residual": True, "init_scale": 0.01,
                        "label_smoothing": 0.0}
    res = run_cli("train", "--scenario", scenario, *FAST, "--method", "probe-test", "--opt", "preset=plain",
                  "--out", tmp_path / "plain")
    assert res.code == 0, res.err
    recorded = json.loads((tmp_path / "plain" / "config.json").read_text())["config"]["method_options"]
    assert recorded["residual"] is False and recorded["label_smoothing"] == 0.1
    res = run_cli("train", "--scenario", scenario, *FAST, "--method", "probe-test", "--opt", "init_scale=0.01",
                  "--out", run, "--resume")
    assert res.code == 0, res.err


def test_a_broken_method_file_is_a_one_line_error_naming_it(methods_folder):
    (methods_folder / "broken_test.py").write_text("import torch\nraise RuntimeError('half written')\n")
    res = run_cli("methods")
    assert res.code == 1 and "method module broken_test" in res.err and "RuntimeError: half written" in res.err
    assert len([ln for ln in res.err.splitlines() if ln.strip()]) == 1 and "Traceback" not in res.err


def test_helper_modules_define_no_method_and_are_fine():
    known = known_methods()
    assert {"zeroshot", "finetune", "moe-adapters", "mage", "calfuse"} <= set(known)
    assert not {"base", "options", "registry", "moe_common", "mage_attributes", "ddas"} & set(known)


def test_an_installed_package_adds_a_method_through_its_entry_point(tmp_path, monkeypatch, scenario, cache_dir):
    site = tmp_path / "site"
    _install(site, "uniil_test_plugin", "uniil_test_plugin", INSTALLED,
             "frozen-scaled = uniil_test_plugin:FrozenScaled")
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "frozen-scaled" in known_methods()
        assert method_class("frozen-scaled").description().startswith("Frozen CLIP features, no training")
        res = run_cli("methods", "show", "frozen-scaled", "--json")
        assert res.code == 0, res.err
        assert [o["name"] for o in json.loads(res.out)["options"]] == ["templates", "scale"]
        res = run_cli("train", "--scenario", scenario, *FAST, "--method", "frozen-scaled", "--opt", "scale=2",
                      "--out", tmp_path / "run")
        assert res.code == 0, res.err
        assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["method_options"]["scale"] == 2.0
    finally:
        _forget("frozen-scaled", "uniil_test_plugin")


def test_a_broken_entry_point_is_a_one_line_error_naming_the_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install(site, "uniil_broken_plugin", None, None, "half-done = uniil_no_such_module:Method")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(UserError, match=r"method plugin 'half-done' \(uniil_no_such_module:Method, from "
                                        r"uniil_broken_plugin\) cannot be loaded: ModuleNotFoundError"):
        known_methods()
    proc = run_uniil_process("methods", env={"PYTHONPATH": str(site)})
    _assert_one_line_error(proc, "method plugin 'half-done'", "uninstall")


# -- `uniil methods` ------------------------------------------------------------------------------
def test_uniil_methods_lists_every_method_with_one_line():
    res = run_cli("methods")
    assert res.code == 0, res.err
    for name in ("zeroshot", "finetune", "moe-adapters", "mage", "calfuse"):
        assert name in res.out
    assert "Continual-CLIP" in res.out and "Mixture of Attribute-Guided Experts" in res.out
    listed = json.loads(run_cli("methods", "--json").out)
    assert all(listed[m] and "\n" not in listed[m] for m in listed)


def test_uniil_methods_show_mage_lists_typed_options_with_help():
    res = run_cli("methods", "show", "mage")
    assert res.code == 0, res.err
    for text in ("no_attributes", "attr_kind", "class, domain, both", "attributes that route", "selector_quantile",
                 "needs --pool"):
        assert text in res.out, text
    shown = json.loads(run_cli("methods", "show", "mage", "--json").out)
    options = {o["name"]: o for o in shown["options"]}
    assert options["attr_kind"] == {"name": "attr_kind", "type": "str", "default": "both",
                                    "choices": ["class", "domain", "both"], "help": "attributes that route"}
    assert options["attr_topk"]["type"] == "int" and options["attr_topk"]["default"] == 5
    assert options["no_attributes"]["type"] == "bool" and options["no_attributes"]["default"] is False
    assert options["label_smoothing"]["type"] == "float"  # the loss reads it: a declared option
    assert all(o["help"] and "\n" not in o["help"] for o in shown["options"])
    moe = json.loads(run_cli("methods", "show", "moe-adapters", "--json").out)
    assert moe["presets"]["mtil"]["num_experts"] == 22
    # whether --pool is needed: always (mage), never (moe-adapters), for some values (zeroshot's prototypes)
    assert (shown["needs_pool"], moe["needs_pool"]) == ("always", "never")
    assert json.loads(run_cli("methods", "show", "zeroshot", "--json").out)["needs_pool"] == "with some options"
    assert {o["name"]: o for o in moe["options"]}["preset"]["choices"] == ["cil", "mtil", "mixed"]
    assert run_cli("methods", "show", "nope").code == 1


# -- parsing and validation -----------------------------------------------------------------------
def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_key_and_bad_value_are_one_line_errors_naming_the_keys(tmp_path):
    args = ["train", "--scenario", "synthetic-uniil", "--clip-model", "uniil-tiny", "--method", "mage"]
    proc = run_uniil_process(*args, "--opt", "attr_top_k=3", "--out", tmp_path / "a")
    _assert_one_line_error(proc, "mage: unknown option(s) attr_top_k; known:", "attr_topk", "no_attributes")
    proc = run_uniil_process(*args, "--opt", "attr_topk=2.5", "--out", tmp_path / "b")
    _assert_one_line_error(proc, "mage: --opt attr_topk='2.5': expected a whole number", "options:", "attr_kind")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method, raw, message", [
    ("mage", {"no_attributes": "maybe"}, "no_attributes='maybe': write true or false"),
    ("mage", {"no_attributes": 1.0}, "write true or false"),
    ("mage", {"num_experts": True}, "expected a whole number"),
    ("mage", {"tau": "inf"}, "tau='inf': expected a number"),
    ("mage", {"tau": "nan"}, "expected a number"),
    ("mage", {"tau": 0}, "tau=0: must be positive"),
    ("mage", {"selector_quantile": 1.5}, "must be between 0 and 1"),
    ("mage", {"attr_kind": "shape"}, "use one of class, domain, both"),
    ("mage", {"anchor": -1}, "anchor=-1: must not be negative"),
    ("mage", {"num_experts": 2, "top_k": 3}, "top_k=3 must be between 1 and num_experts=2"),
    ("finetune", {"adapter_rank": 0}, "must be at least 1"),
    ("finetune", {"label_smoothing": 2}, "must be between 0 and 1"),
    ("zeroshot", {"prototypes": 3}, "expected text"),
    ("zeroshot", {"templates": "a photo"}, "needs {} where the class name goes"),
    ("calfuse", {"calibration": "fixed", "alpha": 1.0}, "alpha=1.0: must lie in (0, 1)"),
    ("moe-adapters", {"ddas_reference": "no-such-dataset"}, "name a dataset"),
])
def test_bad_values_are_refused_by_the_declared_types(method, raw, message):
    with pytest.raises(UserError) as exc:
        method_class(method).parse_options(raw)
    text = str(exc.value)
    assert message in text and text.startswith(f"{method}: ") and "(options: templates, " in text and "\n" not in text


def test_values_parse_from_text_and_from_typed_values_alike():
    mage = method_class("mage")
    text = mage.parse_options({"no_attributes": "TRUE", "attr_topk": "3", "beta": "0", "num_experts": "4.0"})
    typed = mage.parse_options({"no_attributes": True, "attr_topk": 3, "beta": 0, "num_experts": 4})
    assert text == typed and text.attr_topk == 3 and isinstance(text.beta, float) and text.num_experts == 4
    moe = method_class("moe-adapters")
    assert moe.parse_options({"ddas_threshold": "none"}).ddas_threshold is None
    assert moe.parse_options({"ddas_threshold": "0.5", "ddas_reference": "synthetic:sketch"}).ddas_threshold == 0.5
    zs = method_class("zeroshot").parse_options({"templates": ["a {}.", "an image of a {}."]})  # a list joins
    assert zs.templates == "a {}.|an image of a {}."


def test_presets_set_their_bundle_and_explicit_keys_override_it():
    moe = method_class("moe-adapters")
    default = moe.parse_options({})
    assert (default.preset, default.num_experts, default.task_routers, default.selector) == ("cil", 2, False, False)
    mtil = moe.parse_options({"preset": "mtil"})
    assert (mtil.num_experts, mtil.top_k, mtil.task_routers, mtil.freeze_top, mtil.selector, mtil.label_smoothing) \
        == (22, 2, True, 2, True, 0.2)
    mine = moe.parse_options({"num_experts": "4", "preset": "mtil", "label_smoothing": "0"})  # key order is no matter
    assert (mine.num_experts, mine.label_smoothing, mine.task_routers) == (4, 0.0, True)
    assert moe.parse_options({"freeze_top": 3}).num_experts == 2  # the default preset, one key changed
    with pytest.raises(UserError, match="preset='nope': use one of cil, mtil"):
        moe.parse_options({"preset": "nope"})


def test_demo_runs_hold_valid_typed_options():
    from uniil.trainer.demo import DEMO_RUNS

    for _, method, options, pool in DEMO_RUNS:
        assert pool in ("llm", "reference")
        opts = method_class(method).parse_options(options)
        assert all(getattr(opts, k) == v for k, v in options.items())


# -- compatibility --------------------------------------------------------------------------------
def test_a_run_recorded_with_raw_options_still_resumes(tmp_path, scenario, cache_dir):
    run = tmp_path / "zs"
    args = ["train", "--scenario", scenario, *FAST, "--method", "zeroshot", "--opt", "beta=0", "--out", run]
    assert run_cli(*args).code == 0
    before = run_metrics(run).class_il.accuracy_matrix
    config = json.loads((run / "config.json").read_text())
    config["identity"]["method_options"] = config["config"]["method_options"] = {"beta": 0}  # as given, not typed
    (run / "config.json").write_text(json.dumps(config))
    res = run_cli(*args, "--resume")
    assert res.code == 0, res.err
    assert run_metrics(run).class_il.accuracy_matrix == before
    res = run_cli("train", "--scenario", scenario, *FAST, "--method", "zeroshot", "--out", run, "--resume")
    assert res.code == 1 and "different config: method_options" in res.err  # beta 0 is not the default 1
    config["identity"]["method_options"] = {"beta": 0, "no_selector": True}  # a key this version does not know
    (run / "config.json").write_text(json.dumps(config))
    res = run_cli(*args, "--resume")
    assert res.code == 1 and "was written by uniil " in res.err and "cannot read" in res.err
    assert "zeroshot: unknown option(s) no_selector" in res.err


def test_old_configs_load_and_config_errors_name_real_flags():
    old = {"scenario": "synthetic-uniil", "method": "mage", "out": "runs/m", "pool": "p.duckdb", "num_workers": 4,
           "method_options": {"no_attributes": True}}
    cfg = TrainConfig.from_json(old)
    assert cfg.pool.name == "p.duckdb" and cfg.method_options == {"no_attributes": True}
    assert "num_workers" not in cfg.as_json()
    with pytest.raises(UserError, match="--train-per-class must be at least 1"):
        TrainConfig("synthetic-uniil", "finetune", "r", synthetic_train_per_class=0).validate()
    with pytest.raises(UserError, match="--test-per-class must be at least 1"):
        TrainConfig("synthetic-uniil", "finetune", "r", synthetic_test_per_class=0).validate()
    res = run_cli("train", "--scenario", "synthetic-uniil", "--method", "finetune", "--out", "r", "--workers", "2")
    assert res.code == 2 and "No such option: --workers" in res.err


def test_a_bad_declaration_fails_when_the_method_is_defined():
    from dataclasses import dataclass

    from uniil.trainer.methods import ContinualMethod, opt, register_method

    def define(options, presets=None):
        class Method(ContinualMethod):
            Options = options

        Method.presets = presets or {}
        register_method("declaration-test")(Method)

    @dataclass(frozen=True)
    class NoHelp(ContinualMethod.Options):
        k: int = 3

    @dataclass(frozen=True)
    class ListTyped(ContinualMethod.Options):
        k: list = opt(None, "a list")

    @dataclass(frozen=True)
    class WithPreset(ContinualMethod.Options):
        preset: str = opt("a", "a bundle")
        k: int = opt(1, "k")

    try:
        with pytest.raises(TypeError, match="needs one line of help"):
            define(NoHelp)
        with pytest.raises(TypeError, match="use bool, int, float or str"):
            define(ListTyped)
        with pytest.raises(TypeError, match="preset a of method declaration-test: --opt k=1.5: expected a whole"):
            define(WithPreset, {"a": {"k": 1.5}})
        with pytest.raises(TypeError, match="sets undeclared option j"):
            define(WithPreset, {"a": {"j": 1}})
        assert "declaration-test" not in METHODS
    finally:
        METHODS.pop("declaration-test", None)
