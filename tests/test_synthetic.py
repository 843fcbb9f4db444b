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


def test_colour_task_labels_the_colour_of_the_shape(cache_dir):
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


# ---- every rendered dataset ----------------------------------------------------------------------

def test_every_rendered_dataset_is_a_registry_entry_served_by_name():
    from uniil.data.images import dataset_images
    from uniil.data.rendered import RENDERED
    from uniil.errors import UserError

    assert set(RENDERED) == {"synthetic", "synthetic-colours", "synthetic-digits", "synthetic-patterns"}
    for name, spec in RENDERED.items():
        names = load_dataset_names(name)
        assert spec.name == name and spec.domains == names.domains and spec.classes() == names.classes
        src = dataset_images(name, "test")
        assert src.dataset == name and src.domain == names.domains[0] and src.classes == list(names.classes)
        assert len(src) == 10 * len(names.classes)
        assert src.labels == [y for y in range(len(names.classes)) for _ in range(10)]
        with pytest.raises(UserError, match=f"unknown {name} domain 'cartoon'"):
            dataset_images(name, "test", "cartoon")


def test_limited_rendered_splits_spread_over_the_classes():
    from uniil.data.images import dataset_images

    src = dataset_images("synthetic-patterns", "test", limit=12)
    assert src.cache_key is None and len(src) == 12 and len(set(src.labels)) == 10


def _digits(n=3, split="test"):
    from uniil.data.render_base import RenderedDataset
    from uniil.data.rendered import RENDERED

    ds = RenderedDataset(RENDERED["synthetic-digits"], split, "scan", n_per_class=n)
    return ds, [np.asarray(ds.image(i), np.float32) for i in range(len(ds))]


def test_digits_are_light_strokes_on_a_dark_gray_scan():
    ds, images = _digits()
    assert ds.classes == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for img in images:
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()  # gray, like a scan
        ink = img[..., 0] > 120
        assert 0.02 < ink.mean() < 0.4 and img[..., 0][~ink].mean() < 60 and img.max() > 170


def test_digits_are_learnable_but_varied():
    """Nearest neighbour on raw pixels: far above chance (the digits differ), far below 100% (the
    hands differ). Shape matters, not position alone: the mean image of every digit is distinct."""
    _, train = _digits(20, "train")
    _, test = _digits(10, "test")
    xtr = np.stack([a[..., 0].ravel() for a in train])
    xte = np.stack([a[..., 0].ravel() for a in test])
    ytr, yte = np.repeat(np.arange(10), 20), np.repeat(np.arange(10), 10)
    d = (xte ** 2).sum(1)[:, None] - 2 * xte @ xtr.T + (xtr ** 2).sum(1)[None]
    acc = (ytr[d.argmin(1)] == yte).mean()
    assert 0.35 < acc < 0.95, acc


def test_patterns_fill_the_frame_in_any_colour():
    from uniil.data.render_base import RenderedDataset
    from uniil.data.rendered import RENDERED

    ds = RenderedDataset(RENDERED["synthetic-patterns"], "test", "close-up", n_per_class=4)
    images = [np.asarray(ds.image(i), np.float32) for i in range(len(ds))]
    for i, img in enumerate(images):
        quarters = [img[:32, :32], img[:32, 32:], img[32:, :32], img[32:, 32:]]
        # structure in every quarter: no plain background and no single object
        assert min(q.std() for q in quarters) > 10, (ds.classes[ds.labels[i // 4]], i)
    for c in range(len(ds.classes)):  # colours vary within a class: structure, not colour, names it
        means = np.stack([images[c * 4 + k].mean((0, 1)) for k in range(4)])
        assert means.std(0).max() > 15, ds.classes[c]
