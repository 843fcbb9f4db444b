"""Scenarios: presets load, increment types follow from what is new, bad files name the step."""

import pytest

from conftest import run_cli
from uniil.errors import UserError
from uniil.trainer.scenario import known_scenarios, load_scenario, parse_scenario


def test_presets_load_with_the_published_structure():
    assert {"domainnet-dil", "office-home-dil", "mtil-order1", "mtil-order2"} <= set(known_scenarios())
    dn = load_scenario("domainnet-dil")
    assert [s.domain for s in dn.steps] == ["real", "clipart", "infograph", "painting", "quickdraw", "sketch"]
    assert [s.kind for s in dn.steps] == ["base"] + ["domain"] * 5 and len(dn.steps[0].classes) == 345
    mtil = load_scenario("mtil-order1")
    assert mtil.datasets == ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101",
                             "mnist", "oxford_pet", "stanford_cars", "sun397"]
    assert [s.kind for s in mtil.steps] == ["base"] + ["task"] * 10
    assert load_scenario("mtil-order2").datasets[0] == "stanford_cars"
    for name in known_scenarios():  # every preset file parses, with names the registry knows
        assert load_scenario(name).steps


def test_increment_types_in_a_mixed_scenario():
    sc = parse_scenario({"steps": [
        {"dataset": "synthetic", "classes": "0-8", "domain": "photo"},
        {"dataset": "synthetic", "classes": "8-16", "domain": "photo"},
        {"dataset": "synthetic", "classes": "0-16", "domain": "sketch"},
        {"dataset": "office-home", "classes": ["alarm clock", "bike"], "domain": "art"},
        {"dataset": "synthetic", "classes": [16, 17, "heart"], "domain": "clipart"},
        {"dataset": "synthetic", "classes": "0-8", "domain": "photo"},
    ]}, "mixed")
    assert [s.kind for s in sc.steps] == ["base", "class", "domain", "task", "class+domain", "revisit"]
    assert sc.steps[1].classes[0] == "trapezoid" and sc.steps[1].labels == tuple(range(8, 16))
    assert sc.steps[4].classes == ("four-pointed star", "cross", "heart")


@pytest.mark.parametrize("steps, message", [
    ([{"dataset": "cifar1000"}], "step 1: unknown dataset 'cifar1000'"),
    ([{"dataset": "synthetic"}, {"dataset": "synthetic", "classes": ["circle", "dragon"]}],
     "step 2: unknown class 'dragon' in dataset synthetic"),
    ([{"dataset": "domainnet", "domain": "watercolor"}], "step 1: unknown domain 'watercolor' of dataset domainnet"),
    ([{"dataset": "synthetic", "classes": "20-30"}], "class range 20-30 is outside 0-24"),
    ([{"dataset": "synthetic", "clases": "all"}], "unknown key(s) clases"),
])
def test_bad_scenarios_name_the_step_and_the_name(steps, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_scenario({"steps": steps}, "bad")


def test_cli_show_and_errors(tmp_path):
    r = run_cli("scenario", "show", "office-home-dil")
    assert r.code == 0 and "domain" in r.out and "real world" in r.out
    f = tmp_path / "mine.yaml"
    f.write_text("steps:\n  - {dataset: synthetic, classes: 0-4}\n  - {dataset: synthetic, classes: 4-8}\n")
    r = run_cli("scenario", "show", f, "--json")
    assert r.code == 0 and '"kind": "class"' in r.out
    r = run_cli("scenario", "show", "nope")
    assert r.code == 1 and "unknown scenario 'nope'" in r.err and "domainnet-dil" in r.err
    f.write_text("steps: [")
    r = run_cli("scenario", "show", f)
    assert r.code == 1 and "cannot read scenario" in r.err


def _seed1993(n):
    import numpy as np

    np.random.seed(1993)
    return np.random.permutation(n).tolist()


@pytest.mark.parametrize("name, dataset, n, base, inc", [
    ("cifar100-b0inc5", "cifar100", 100, 0, 5), ("cifar100-b0inc10", "cifar100", 100, 0, 10),
    ("cifar100-b0inc20", "cifar100", 100, 0, 20), ("tinyimagenet-b100inc5", "tinyimagenet", 200, 100, 5),
    ("tinyimagenet-b100inc10", "tinyimagenet", 200, 100, 10), ("tinyimagenet-b100inc20", "tinyimagenet", 200, 100, 20),
    ("imagenet-r-inc20", "imagenet-r", 200, 0, 20),
])
def test_class_incremental_presets_follow_the_seed_1993_order(name, dataset, n, base, inc):
    sc = load_scenario(name)
    sizes = [len(s.labels) for s in sc.steps]
    assert sizes == ([base] if base else []) + [inc] * ((n - base) // inc)
    assert [s.kind for s in sc.steps] == ["base"] + ["class"] * (len(sc.steps) - 1)
    assert sc.datasets == [dataset] and [lab for s in sc.steps for lab in s.labels] == _seed1993(n)
    if dataset == "cifar100":
        assert sc.steps[0].labels[:4] == (68, 56, 78, 8) and sc.steps[0].classes[:2] == ("road", "palm tree")


def test_uniil_preset_mixes_class_task_and_domain_steps():
    sc = load_scenario("uniil")
    assert [(s.dataset, s.domain, s.kind) for s in sc.steps] == [
        ("cifar100", "photo", "base"), ("cifar100", "photo", "class"), ("domainnet", "real", "task"),
        ("domainnet", "sketch", "domain"), ("domainnet", "clipart", "domain"), ("flowers102", "photo", "task"),
        ("food101", "photo", "task")]
    assert [len(s.labels) for s in sc.steps] == [50, 50, 345, 345, 345, 102, 101]
    assert sc.steps[0].labels + sc.steps[1].labels == tuple(_seed1993(100))
