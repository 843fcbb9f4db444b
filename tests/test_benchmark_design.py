"""synthetic-uniil (v2) is well posed: after any step, every test image has exactly one correct label
in the union vocabulary. Its datasets share no class name, frozen uniil-micro features tell which
dataset an image comes from (a linear probe on held-out images), and the renderers and the render
cache give the same image for the same (seed, split, domain, label, index) every time.

v1's task step, synthetic-colours, failed this: its images came from the shape steps' world, so a red
star was both "star" and "red". The probe's control below shows the probe cannot tell those apart.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from uniil.data.images import synthetic_images
from uniil.data.registry import load_dataset_names
from uniil.data.render_base import RenderConfig, RenderedDataset
from uniil.data.render_cache import CachedRenders, render_path
from uniil.data.rendered import RENDERED
from uniil.trainer.scenario import load_scenario

log = logging.getLogger(__name__)

SCENARIO = "synthetic-uniil"
NEW = ("synthetic-digits", "synthetic-patterns")


def _normal(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.lower())


def shared_names(classes: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """Class names (compared without case, spaces, hyphens and underscores) that more than one dataset uses."""
    owners: dict[str, set[str]] = {}
    for dataset, names in classes.items():
        for n in names:
            owners.setdefault(_normal(n), set()).add(dataset)
    return {n: ds for n, ds in owners.items() if len(ds) > 1}


# ---- (a) names ---------------------------------------------------------------------------------

def test_the_scenarios_datasets_share_no_class_name():
    scenario = load_scenario(SCENARIO)
    assert scenario.datasets == ["synthetic", "synthetic-digits", "synthetic-patterns"]
    assert shared_names({d: load_dataset_names(d).classes for d in scenario.datasets}) == {}
    # the comparison sees through case, spaces and hyphens
    assert shared_names({"a": ("Right-Triangle", "x"), "b": ("right triangle",)}) == {"righttriangle": {"a", "b"}}


def test_the_scenario_keeps_the_uni_il_mix():
    steps = load_scenario(SCENARIO).steps
    assert [s.kind for s in steps] == ["base", "class", "domain", "task", "class+domain", "task", "domain"]
    assert [(s.dataset, s.domain, len(s.classes)) for s in steps] == [
        ("synthetic", "photo", 8), ("synthetic", "photo", 8), ("synthetic", "sketch", 16),
        ("synthetic-digits", "scan", 10), ("synthetic", "clipart", 8), ("synthetic-patterns", "close-up", 10),
        ("synthetic", "painting", 24)]


# ---- (b) a linear probe names an image's dataset ---------------------------------------------------

@pytest.fixture(scope="module")
def micro():
    from uniil.backbones.factory import load_backbone
    from uniil.backbones.spec import BackboneSpec

    return load_backbone(BackboneSpec.from_options("uniil-micro", None))


def _features(micro, name: str, split: str, domain: str, n_per_class: int) -> np.ndarray:
    src = synthetic_images(name, split, domain, n_per_class)
    return micro.encode_images([src.load(i) for i in range(len(src))])


def _probe(train: list[tuple[np.ndarray, int]], test: list[tuple[np.ndarray, int]], k: int,
           steps: int = 500) -> list[float]:
    """Multinomial logistic regression on standardised frozen features, full batch, classes weighted
    to equal total weight; returns the recall of each class on the test features."""
    torch.manual_seed(0)
    x = torch.from_numpy(np.concatenate([f for f, _ in train]))
    y = torch.cat([torch.full((len(f),), c) for f, c in train])
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    counts = torch.bincount(y, minlength=k).float()
    weight = counts.sum() / (k * counts)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y, weight=weight) + 1e-4 * (w ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hits = torch.zeros(k)
        totals = torch.zeros(k)
        for f, c in test:
            pred = (((torch.from_numpy(f) - mean) / std) @ w + b).argmax(1)
            hits[c] += (pred == c).sum()
            totals[c] += len(f)
        recall = (hits / totals).tolist()
    return recall


@pytest.mark.slow  # about 10 s on an idle 2-core machine, 40 s on a busy one
@pytest.mark.timeout(1800)  # its fixture trains uniil-micro when no earlier test did
def test_frozen_features_name_the_dataset_of_held_out_images(micro, cache_dir):
    """Fit on the train split of every (dataset, domain) of the scenario, score on the test split.
    Balanced: each dataset about 480 training and 200 test images, spread over its domains and
    classes, and the loss weights datasets equally."""
    scenario = load_scenario(SCENARIO)
    pairs = list(dict.fromkeys((s.dataset, s.domain) for s in scenario.steps))
    index = {d: i for i, d in enumerate(scenario.datasets)}
    per_dataset = {d: sum(1 for p in pairs if p[0] == d) * len(load_dataset_names(d).classes) for d in index}
    train, test = [], []
    for dataset, domain in pairs:
        # images per class so that every dataset has about 480 train and 200 test images
        n_train, n_test = max(1, round(480 / per_dataset[dataset])), max(1, round(200 / per_dataset[dataset]))
        train.append((_features(micro, dataset, "train", domain, n_train), index[dataset]))
        test.append((_features(micro, dataset, "test", domain, n_test), index[dataset]))
    recall = _probe(train, test, len(index))
    log.info("dataset probe recall %s", dict(zip(index, recall)))
    # What this guards against is v1's design (58.9%: a red star was both "star" and "red"). Measured:
    # 99.0 on uniil-micro v2, 97.1 on v3 (synthetic 97.4, digits 99.5, patterns 94.5), whose features
    # spend more of themselves on shapes' attributes.
    assert np.mean(recall) >= 0.95 and min(recall) >= 0.90, dict(zip(index, recall))

    # Control: v1's pair, whose images come from one world, is what the probe cannot separate.
    control_train = [(_features(micro, "synthetic", "train", "photo", 5), 0),
                     (_features(micro, "synthetic-colours", "train", "photo", 10), 1)]
    control_test = [(_features(micro, "synthetic", "test", "photo", 4), 0),
                    (_features(micro, "synthetic-colours", "test", "photo", 8), 1)]
    control = _probe(control_train, control_test, 2)
    log.info("control probe (v1: synthetic vs synthetic-colours) recall %s", control)
    assert np.mean(control) < 0.8, control


# ---- (c) deterministic renderers and an exact render cache -------------------------------------------

def _pixels(img) -> np.ndarray:
    return np.asarray(img, np.uint8)


@pytest.mark.parametrize("name", NEW)
def test_new_renderers_are_pure_functions_of_seed_split_domain_label_index(name):
    spec = RENDERED[name]
    classes = list(spec.classes())
    full = RenderedDataset(spec, "train", None, n_per_class=3)
    some = RenderedDataset(spec, "train", None, n_per_class=3, classes=[classes[7], classes[2]])
    assert np.array_equal(_pixels(full.image(7 * 3 + 2)), _pixels(some.image(2)))  # other subset, same image
    assert np.array_equal(_pixels(full.image(4)), _pixels(RenderedDataset(spec, "train", None, 3).image(4)))
    images = [_pixels(full.image(i)) for i in range(len(full))]
    assert len({a.tobytes() for a in images}) == len(images)  # every image its own
    others = [RenderedDataset(spec, "test", None, 3),
              RenderedDataset(spec, "train", None, 3, config=RenderConfig(seed=1))]
    for other in others:  # splits and seeds are other streams
        assert not np.array_equal(images[0], _pixels(other.image(0)))
    for size in (32, 96):  # any size
        img = RenderedDataset(spec, "val", None, 1, config=RenderConfig(image_size=size)).image(0)
        assert img.size == (size, size) and img.mode == "RGB"


def test_datasets_draw_from_their_own_random_streams():
    """The same (split, domain, label, index) in two datasets is two unrelated images."""
    first = {name: _pixels(RenderedDataset(spec, "train", None, 1).image(0)) for name, spec in RENDERED.items()}
    assert len({a.tobytes() for a in first.values()}) == len(first)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_the_render_cache_serves_exactly_the_rendered_images(name, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path))
    spec = RENDERED[name]
    src = synthetic_images(name, "test", None, 2)
    assert src.cache_key and name in src.cache_key and f"render-v{spec.version}" in src.cache_key
    assert not (tmp_path / "renders").exists()  # building a source renders nothing
    direct = RenderedDataset(spec, "test", None, 2)
    for i in range(len(src)):
        assert np.array_equal(_pixels(src.load(i)), _pixels(direct.image(i))), i
    files = list((tmp_path / "renders").glob("*.npy"))
    assert files == [render_path(src.cache_key)]
    assert np.load(files[0]).shape == (len(src), 64, 64, 3)

    # a new source (a later run) reads the file and renders nothing
    monkeypatch.setattr(RenderedDataset, "image", lambda self, i: pytest.fail("rendered again"))
    again = synthetic_images(name, "test", None, 2)
    assert np.array_equal(_pixels(again.load(len(again) - 1)), _pixels(src.load(len(src) - 1)))


def test_other_splits_are_other_cache_files_and_a_limit_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path))
    classes = list(RENDERED["synthetic-digits"].classes())
    keys = {synthetic_images("synthetic-digits", "test", "scan", 2).cache_key,
            synthetic_images("synthetic-digits", "test", "scan", 3).cache_key,
            synthetic_images("synthetic-digits", "train", "scan", 2).cache_key,
            synthetic_images("synthetic-digits", "test", "scan", 2, classes=classes[:4]).cache_key,
            synthetic_images("synthetic-patterns", "test", "close-up", 2).cache_key}
    assert len({render_path(k) for k in keys}) == 5
    sub = synthetic_images("synthetic-digits", "test", "scan", 2, classes=[classes[5], classes[1]])
    assert [sub.classes[y] for y in sub.labels] == [classes[5]] * 2 + [classes[1]] * 2
    assert np.array_equal(_pixels(sub.load(2)), _pixels(RenderedDataset(RENDERED["synthetic-digits"], "test", "scan",
                                                                         2).image(1 * 2 + 0)))
    limited = synthetic_images("synthetic-digits", "test", "scan", 2, limit=3)
    assert limited.cache_key is None and limited.load(0).size == (64, 64)
    assert len(list((tmp_path / "renders").glob("*.npy"))) == 1  # only `sub` was loaded whole


def test_a_damaged_cache_file_is_rendered_again(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path))
    src = synthetic_images("synthetic-patterns", "val", None, 1)
    want = [_pixels(src.load(i)) for i in range(len(src))]
    path = render_path(src.cache_key)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    again = synthetic_images("synthetic-patterns", "val", None, 1)
    assert all(np.array_equal(_pixels(again.load(i)), w) for i, w in enumerate(want))
    assert np.load(path).shape[0] == len(src)  # rewritten whole
    np.save(path, np.zeros((3, 8, 8, 3), np.uint8))  # another array under this name: not ours
    third = synthetic_images("synthetic-patterns", "val", None, 1)
    assert np.array_equal(_pixels(third.load(0)), want[0])


def test_threads_and_processes_share_one_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIIL_CACHE_DIR", str(tmp_path))
    spec = RENDERED["synthetic-digits"]
    ds = RenderedDataset(spec, "train", None, 2)
    calls = []

    def draw(i):
        calls.append(i)
        return ds.image(i)

    loaders = [CachedRenders("shared-key", len(ds), draw) for _ in range(4)]
    threads = [threading.Thread(target=loader.array) for loader in loaders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == len(ds)  # rendered once in this process; the other loaders read the file
    assert all(np.array_equal(loader.array(), loaders[0].array()) for loader in loaders)

    # two processes that miss at once both write whole files by rename: one valid file, no leftovers
    code = ("from uniil.data.images import synthetic_images; import hashlib, numpy as np; "
            "s = synthetic_images('synthetic-patterns', 'train', None, 2); "
            "print(hashlib.sha256(b''.join(np.asarray(s.load(i)).tobytes() for i in range(len(s)))).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    digests = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    src = synthetic_images("synthetic-patterns", "train", None, 2)
    mine = hashlib.sha256(b"".join(np.asarray(src.load(i)).tobytes() for i in range(len(src)))).hexdigest()
    assert digests == [mine, mine]
    assert sorted(p.name for p in (tmp_path / "renders").iterdir()) == sorted(
        [render_path("shared-key").name, render_path(src.cache_key).name])
