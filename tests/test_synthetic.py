"""The synthetic dataset: seeded, order-independent, every class in every domain, ImageFolder export."""

import json

import numpy as np
import pytest

from uniil.data.registry import load_dataset_names
from uniil.data.synthetic import COLOURS, DOMAINS, SIZES, TEXTURES, SyntheticConfig, SyntheticDataset


def test_every_class_renders_in_every_domain_with_ground_truth():
    classes = load_dataset_names("synthetic").classes
    for domain in DOMAINS:
        ds = SyntheticDataset("train", domain, n_per_class=1, config=SyntheticConfig(image_size=48))
        assert len(ds) == len(classes)
        for i in range(len(ds)):
            img, label = ds[i]
            truth = ds.truth(i)
            assert img.size == (48, 48) and img.mode == "RGB"
            assert truth.shape == classes[label] and truth.domain == domain
            assert truth.colour in COLOURS and truth.texture in TEXTURES and truth.size in SIZES


def test_rendering_is_a_pure_function_of_seed_split_domain_class_index():
    a = SyntheticDataset("train", "photo", n_per_class=3)
    b = SyntheticDataset("train", "photo", n_per_class=3, classes=["star", "heart"])
    star = a.classes.index("star")
    assert np.array_equal(np.asarray(a[star * 3 + 2][0]), np.asarray(b[2][0]))  # same image, other subset
    assert np.array_equal(np.asarray(a[5][0]), np.asarray(a[5][0]))
    test = SyntheticDataset("test", "photo", n_per_class=3)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(test[0][0]))  # splits are disjoint streams
    other_seed = SyntheticDataset("train", "photo", n_per_class=3, config=SyntheticConfig(seed=1))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(other_seed[0][0]))


def test_domains_look_different():
    def mean_brightness(domain):
        ds = SyntheticDataset("train", domain, n_per_class=2)
        return np.mean([np.asarray(ds[i][0], np.float32).mean() for i in range(0, len(ds), 5)])

    assert mean_brightness("sketch") > 215 and mean_brightness("clipart") > 200  # light, plain backgrounds
    assert mean_brightness("photo") < 200


def test_export_image_folder(tmp_path):
    ds = SyntheticDataset("test", "clipart", n_per_class=2, classes=["star", "right triangle"])
    root = ds.export_image_folder(tmp_path / "synth")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["right_triangle", "star"]
    assert len(list(root.rglob("*.png"))) == 4
    truth = [json.loads(line) for line in (root / "truth.jsonl").read_text().splitlines()]
    assert len(truth) == 4 and {t["shape"] for t in truth} == {"star", "right triangle"}
    assert all((root / t["path"]).exists() for t in truth)


def test_colour_task_labels_the_colour_of_the_shape():
    from uniil.data.images import dataset_images
    from uniil.data.synthetic import COLOURS

    ds = SyntheticDataset("test", "clipart", n_per_class=3, target="colour")
    assert ds.classes == list(COLOURS) and len(ds) == 36
    truths = [ds.truth(i) for i in range(len(ds))]
    assert [t.colour for t in truths] == [c for c in COLOURS for _ in range(3)]
    assert len({t.shape for t in truths}) > 5  # shapes vary: they are not the label here
    with pytest.raises(ValueError, match="colour task"):
        SyntheticDataset("test", "sketch", target="colour")  # sketches have no colour
    src = dataset_images("synthetic-colours", "test", "photo")
    assert src.dataset == "synthetic-colours" and src.classes == list(COLOURS) and src.cache_key
    shape_src = dataset_images("synthetic", "test", "photo")
    assert src.cache_key != shape_src.cache_key
    assert not np.array_equal(np.asarray(src.load(0)), np.asarray(shape_src.load(0)))
