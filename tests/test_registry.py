"""Dataset names: every registry entry loads, in index order, with the published class counts."""

import pytest

from uniil.data.registry import known_datasets, load_dataset_names, resolve_names
from uniil.errors import UserError

COUNTS = {"cifar100": 100, "tinyimagenet": 200, "imagenet-r": 200, "domainnet": 345, "office-home": 65,
          "aircraft": 100, "caltech101": 101, "dtd": 47, "eurosat": 10, "flowers102": 102, "food101": 101,
          "mnist": 10, "oxford_pet": 37, "stanford_cars": 196, "sun397": 397, "synthetic": 24,
          "synthetic-colours": 12, "synthetic-digits": 10, "synthetic-patterns": 10}


def test_registry_has_every_dataset_with_its_class_count():
    assert set(known_datasets()) == set(COUNTS)
    for name, count in COUNTS.items():
        names = load_dataset_names(name)
        assert len(names.classes) == count, name
        assert len({c.lower() for c in names.classes}) == count, f"duplicate class in {name}"
        assert all(c == c.strip() and c for c in names.classes)


def test_index_order_and_domains():
    cifar = load_dataset_names("cifar100").classes
    assert cifar[:3] == ("apple", "aquarium fish", "baby") and cifar[-1] == "worm"
    assert load_dataset_names("food101").classes[0] == "apple pie"
    assert load_dataset_names("flowers102").classes[0] == "pink primrose"
    tiny = load_dataset_names("tinyimagenet")
    assert tiny.class_ids[0] == "n01443537" and tiny.class_ids == tuple(sorted(tiny.class_ids))
    assert load_dataset_names("domainnet").domains == ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    assert load_dataset_names("office-home").domains == ("art", "clipart", "product", "real world")
    assert set(load_dataset_names("synthetic").domains) >= {"photo", "clipart", "sketch", "painting", "inverted"}
    digits = load_dataset_names("synthetic-digits")
    assert digits.classes[:3] == ("zero", "one", "two") and digits.classes[-1] == "nine" and digits.domains == ("scan",)
    patterns = load_dataset_names("synthetic-patterns")
    assert patterns.classes[0] == "brick wall" and patterns.domains == ("close-up",)
    assert (digits.context, patterns.context) == ("a handwritten digit", "a texture or surface pattern")


def test_custom_names(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my classes\nred fox\n\narctic fox\n")
    names = resolve_names(None, f, ["photo", "sketch"])
    assert names.dataset == "mine" and names.classes == ("red fox", "arctic fox") and names.domains == ("photo", "sketch")
    root = tmp_path / "imgs"
    for c in ("snow_leopard", "alarm_clock"):
        (root / c).mkdir(parents=True)
    folder = resolve_names(str(root))
    assert folder.classes == ("alarm clock", "snow leopard") and folder.class_ids == ("alarm_clock", "snow_leopard")
    f.write_text("fox\nFox\n")
    with pytest.raises(UserError, match="appears twice"):
        resolve_names(None, f)
    with pytest.raises(UserError, match="no class sub-folders"):
        resolve_names(str(tmp_path / "imgs" / "alarm_clock"))
