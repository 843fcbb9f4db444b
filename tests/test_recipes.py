"""Recipes and `uniil sweep`: values chosen on a validation split carved from the training images
(never the test split), written to a recipe file with how they were chosen, used by `uniil train`
and `uniil bench` as defaults that flags override; a recipe with an unknown method or option is
one line naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_cli, run_metrics
from uniil.data.images import synthetic_images
from uniil.trainer import engine
from uniil.trainer.recipes import find_recipe, load_recipe, shipped
from uniil.trainer.scenario import known_scenarios, load_scenario
from uniil.trainer.sources import DataOptions, step_source

SHORT = "name: short\nsteps:\n  - {dataset: synthetic, classes: '0-3', domain: photo}\n" \
        "  - {dataset: synthetic, classes: '3-6', domain: photo}\n"
TINY = ["--clip-model", "uniil-tiny", "--batch-size", "8", "--iters", "2"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "short.yaml"
    path.write_text(SHORT)
    return path


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def config_of(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["config"]


# -- the validation carve -------------------------------------------------------------------------

def test_val_split_is_carved_from_training_images_and_never_reads_the_test_split():
    step = load_scenario("synthetic-uniil").steps[0]
    opts = DataOptions(synthetic_train_per_class=10, synthetic_test_per_class=5, eval_split="val")
    train, val = step_source(step, "train", opts), step_source(step, "test", opts)
    whole = synthetic_images(step.dataset, "train", step.domain, 10, classes=list(step.classes))
    test = step_source(step, "test", DataOptions(synthetic_train_per_class=10, synthetic_test_per_class=5))
    assert set(train.keys) | set(val.keys) == set(whole.keys)
    assert not set(train.keys) & set(val.keys)
    assert not set(val.keys) & set(test.keys) and all("/train/" in k for k in val.keys)
    for label in set(whole.labels):  # 20% of every class, the same on every call
        assert [y for y in val.labels].count(label) == 2
    again = step_source(step, "test", opts)
    assert again.keys == val.keys and again.cache_key == val.cache_key != whole.cache_key
    # The carved images are the training images themselves, pixel for pixel.
    i = whole.keys.index(val.keys[0])
    assert (np.asarray(val.load(0)) == np.asarray(whole.load(i))).all()


# -- recipe files --------------------------------------------------------------------------------

@pytest.mark.parametrize("data,named", [
    ({"scenario": "x", "methodz": {}}, "'methodz'"),
    ({"defaults": {"epoch": 3}}, "'defaults.epoch'"),
    ({"methods": {"no-such-method": {"lr": 0.1}}}, "'methods.no-such-method'"),
    ({"methods": {"finetune": {"lr": 0.1, "options": {"adapter_rnk": 8}}}}, "'methods.finetune.options.adapter_rnk'"),
    ({"options": {"betaa": 1}, "methods": {"mage": {"lr": 0.1}}}, "'options.betaa'"),
    ({"methods": {"finetune": {"lr": "fast"}}}, "methods.finetune.lr"),
    ({"methods": {"finetune": {"learning_rate": 0.1}}}, "'methods.finetune.learning_rate'"),
    ({"methods": {"mage": {"options": {"beta": "high"}}}}, "methods.mage"),
])
def test_a_bad_recipe_is_one_line_naming_the_file_and_the_key(tmp_path, scenario, data, named):
    path = write(tmp_path / "bad.yaml", data)
    r = run_cli("train", "--scenario", scenario, "--method", "finetune", "--out", tmp_path / "run",
                "--recipe", path, *TINY)
    assert r.code == 1, r.err
    line = r.err.strip()
    assert "\n" not in line and "Traceback" not in r.err
    assert str(path) in line and named in line, line
    assert not (tmp_path / "run").exists()


def test_a_missing_recipe_file_is_one_line(tmp_path, scenario):
    r = run_cli("train", "--scenario", scenario, "--method", "zeroshot", "--out", tmp_path / "run",
                "--recipe", tmp_path / "nope.yaml", *TINY)
    assert r.code == 1 and "--recipe" in r.err and "nope.yaml" in r.err and "\n" not in r.err.strip()


def test_train_takes_the_recipe_for_what_flags_do_not_give(tmp_path, scenario):
    recipe = write(tmp_path / "r.yaml", {
        "scenario": "short", "about": "by hand",
        "defaults": {"epochs": 3, "train_per_class": 5, "test_per_class": 3, "warmup": 2},
        "options": {"templates": "a rendering of a {}."},
        "methods": {"finetune": {"lr": 0.02, "options": {"adapter_rank": 8}, "chosen": "by hand"}}})
    base = ["train", "--scenario", scenario, "--method", "finetune", "--clip-model", "uniil-tiny",
            "--recipe", recipe]
    r = run_cli(*base, "--out", tmp_path / "a")
    assert r.code == 0, r.err
    cfg = config_of(tmp_path / "a")
    assert (cfg["lr"], cfg["epochs"], cfg["synthetic_train_per_class"], cfg["synthetic_test_per_class"],
            cfg["warmup"]) == (0.02, 3, 5, 3, 2)
    assert cfg["method_options"]["adapter_rank"] == 8
    assert cfg["method_options"]["templates"] == "a rendering of a {}."
    assert cfg["recipe"] == str(recipe)
    assert run_metrics(tmp_path / "a").test_sizes == [9, 9]
    # Flags and --opt win over the recipe; --recipe none is the built-in defaults.
    r = run_cli(*base, "--out", tmp_path / "b", "--lr", "0.005", "--epochs", "1", "--opt", "adapter_rank=4")
    assert r.code == 0, r.err
    cfg = config_of(tmp_path / "b")
    assert (cfg["lr"], cfg["epochs"], cfg["synthetic_train_per_class"], cfg["method_options"]["adapter_rank"]) == \
        (0.005, 1, 5, 4)
    r = run_cli("train", "--scenario", scenario, "--method", "zeroshot", "--clip-model", "uniil-tiny",
                "--recipe", "none", "--out", tmp_path / "c")
    assert r.code == 0, r.err
    cfg = config_of(tmp_path / "c")
    assert (cfg["lr"], cfg["synthetic_train_per_class"], cfg["recipe"]) == (1e-3, 40, None)
    # A method the recipe does not name gets the shared defaults and options only.
    r = run_cli("train", "--scenario", scenario, "--method", "zeroshot", "--clip-model", "uniil-tiny",
                "--recipe", recipe, "--out", tmp_path / "d")
    assert r.code == 0, r.err
    cfg = config_of(tmp_path / "d")
    assert cfg["lr"] == 1e-3 and cfg["synthetic_train_per_class"] == 5
    assert cfg["method_options"]["templates"] == "a rendering of a {}."


def test_every_shipped_recipe_loads_and_names_a_preset():
    found = [name for name in known_scenarios() if shipped(name)]
    assert "synthetic-uniil" in found
    for name in found:
        recipe = find_recipe(None, name)
        assert recipe is not None and recipe.scenario == name and recipe.about
        for method, m in recipe.methods.items():
            assert m.chosen, f"{name}: {method} does not say how its values were chosen"


# -- uniil sweep ---------------------------------------------------------------------------------

def test_sweep_chooses_on_validation_and_writes_a_recipe_train_uses(tmp_path, scenario, monkeypatch):
    seen = []
    real = engine.train

    def train(cfg, progress=None, on_step=None):
        seen.append(cfg)
        return real(cfg, progress, on_step)

    monkeypatch.setattr(engine, "train", train)
    out, recipe = tmp_path / "sweep", tmp_path / "recipes" / "short.yaml"
    args = ["sweep", "--scenario", scenario, "--methods", "zeroshot,finetune", "--lrs", "1e-4,0.05",
            "--grid", "finetune:adapter_rank=4,8", "--out", out, "--write", recipe, "--clip-model", "uniil-tiny",
            "--train-per-class", "5", "--test-per-class", "2", "--batch-size", "8", "--iters", "3",
            "--opt", "templates=a rendering of a {}."]
    r = run_cli(*args)
    assert r.code == 0, r.err
    # 1 zeroshot candidate + 2 lrs x 2 ranks, each trained and scored on the carve only.
    assert len(seen) == 5 and all(c.eval_split == "val" for c in seen)
    assert {(c.lr, int(c.method_options["adapter_rank"])) for c in seen if c.method == "finetune"} == \
        {(1e-4, 4), (1e-4, 8), (0.05, 4), (0.05, 8)}
    for c in seen:  # the carve: 4 of 5 training images per class, 1 scored
        m = run_metrics(c.out)
        assert m.test_sizes == [3, 3]
    got = load_recipe(recipe)
    bench = json.loads((out / "bench.json").read_text())["results"]
    scores = {label: (res["mean"]["last"], res["mean"]["avg"]) for label, res in bench.items()
              if label.startswith("finetune@")}
    best = max(scores, key=scores.get)  # validation Last, then Avg; the first of equals in grid order
    ft = got.methods["finetune"]
    assert best == f"finetune@lr={ft.lr:g},adapter_rank={ft.options['adapter_rank']}"
    assert "validation" in ft.chosen and str(round(scores[best][0], 2)) in ft.chosen
    assert got.methods["zeroshot"].lr is None and "no parameters" in got.methods["zeroshot"].chosen
    assert got.defaults["synthetic_train_per_class"] == 5 and got.defaults["iters"] == 3
    assert got.options == {"templates": "a rendering of a {}."}
    assert len(got.extra["candidates"]["finetune"]) == 4 and "never read" in got.about
    # uniil train takes the chosen values.
    r = run_cli("train", "--scenario", scenario, "--method", "finetune", "--clip-model", "uniil-tiny",
                "--recipe", recipe, "--out", tmp_path / "run")
    assert r.code == 0, r.err
    cfg = config_of(tmp_path / "run")
    assert cfg["lr"] == ft.lr and cfg["method_options"]["adapter_rank"] == ft.options["adapter_rank"] in (4, 8)
    assert cfg["eval_split"] == "test" and run_metrics(tmp_path / "run").test_sizes == [6, 6]
    # A rerun trains nothing (every candidate finished) and writes the same choice.
    seen.clear()
    r = run_cli(*args)
    assert r.code == 0 and not seen
    assert load_recipe(recipe).methods["finetune"] == ft


def test_sweep_keeps_the_recipes_earlier_choices_it_does_not_grid(tmp_path, scenario, monkeypatch):
    """A sweep of one option must not silently drop a method's other chosen options (a sweep of
    mage's variants once ran with train_vocab=step because the recipe's train_vocab=seen was lost)."""
    seen = []
    real = engine.train
    monkeypatch.setattr(engine, "train", lambda cfg, progress=None, on_step=None:
                        (seen.append(cfg), real(cfg, progress, on_step))[1])
    recipe = write(tmp_path / "r.yaml", {
        "scenario": "short", "about": "by hand", "defaults": {"train_per_class": 5, "test_per_class": 2},
        "methods": {"finetune": {"lr": 0.02, "options": {"adapter_rank": 4, "train_vocab": "seen"},
                                 "chosen": "by hand"}}})
    out = tmp_path / "refined.yaml"
    r = run_cli("sweep", "--scenario", scenario, "--methods", "finetune", "--lrs", "1e-3",
                "--grid", "finetune:adapter_rank=8", "--recipe", recipe, "--out", tmp_path / "s", "--write", out,
                "--clip-model", "uniil-tiny", "--batch-size", "8", "--iters", "1")
    assert r.code == 0, r.err
    assert [(c.lr, int(c.method_options["adapter_rank"]), c.method_options["train_vocab"]) for c in seen] == \
        [(1e-3, 8, "seen")]
    got = load_recipe(out).methods["finetune"]
    assert (got.lr, got.options) == (1e-3, {"adapter_rank": 8, "train_vocab": "seen"})
    assert "kept from the recipe" in got.chosen and "train_vocab=seen" in got.chosen


def test_what_a_sweep_inherits_yields_to_its_grid_its_presets_and_opt(tmp_path, scenario):
    from uniil.trainer.config import TrainConfig
    from uniil.trainer.sweep import sweep_config

    recipe = load_recipe(write(tmp_path / "r.yaml", {
        "scenario": "short", "about": "by hand",
        "methods": {"moe-adapters": {"lr": 0.01, "options": {"num_experts": 4, "adapter_rank": 8, "lb_weight": 0.1,
                                                             "train_vocab": "seen"}, "chosen": "by hand"}}}))

    def inherited(grid, shared=None):
        cfg = sweep_config(str(scenario), "moe-adapters", "1e-3", grid, "0", tmp_path / "s",
                           TrainConfig(scenario=str(scenario), method="moe-adapters", out=tmp_path / "o"),
                           tmp_path / "w.yaml", recipe, [], shared or {})
        return cfg.inherited("moe-adapters")

    assert inherited([]) == {"num_experts": 4, "adapter_rank": 8, "lb_weight": 0.1, "train_vocab": "seen"}
    assert inherited(["moe-adapters:adapter_rank=16,32"]) == {"num_experts": 4, "lb_weight": 0.1, "train_vocab": "seen"}
    # a preset tried sets num_experts: an inherited explicit value would override the preset's
    assert inherited(["moe-adapters:preset=cil,mixed"]) == {"adapter_rank": 8, "lb_weight": 0.1, "train_vocab": "seen"}
    assert inherited([], {"train_vocab": "step"}) == {"num_experts": 4, "adapter_rank": 8, "lb_weight": 0.1}


@pytest.mark.parametrize("extra,says", [
    (["--lrs", "0,1e-3"], "--lrs"),
    (["--grid", "finetune:adapter_rank"], "--grid"),
    (["--grid", "mage:beta=0,1"], "not one of --methods"),
    (["--grid", "finetune:adapter_rnk=4,8"], "adapter_rnk"),
    (["--grid", "finetune:adapter_rank=4,many"], "adapter_rank"),
])
def test_sweep_mistakes_are_one_line_before_anything_runs(tmp_path, scenario, extra, says):
    r = run_cli("sweep", "--scenario", scenario, "--methods", "finetune", "--out", tmp_path / "s",
                "--write", tmp_path / "r.yaml", *TINY, *extra)
    assert r.code != 0 and says in r.err and "Traceback" not in r.err, r.err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r.yaml").exists()


def test_bench_variants_and_recipe(tmp_path, scenario):
    recipe = write(tmp_path / "r.yaml", {"scenario": "short", "about": "by hand",
                                         "defaults": {"train_per_class": 4, "test_per_class": 2},
                                         "methods": {"finetune": {"lr": 0.02, "chosen": "by hand"}}})
    r = run_cli("bench", "--scenario", scenario, "--methods", "finetune,ft-small=finetune", "--seeds", "0",
                "--out", tmp_path / "b", "--recipe", recipe, "--opt", "ft-small:adapter_rank=4", *TINY)
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "b" / "bench.json").read_text())["results"]
    assert res["ft-small"]["method"] == "finetune" and res["ft-small"]["options"]["adapter_rank"] == 4
    assert res["finetune"]["lr"] == res["ft-small"]["lr"] == 0.02
    assert res["finetune"]["options"]["adapter_rank"] != 4
    assert config_of(tmp_path / "b" / "runs" / "ft-small-seed0")["synthetic_train_per_class"] == 4
