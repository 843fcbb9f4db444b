"""Real datasets as image sources: tiny fake copies in their real on-disk formats (CIFAR's pickles,
MNIST's idx files, .mat files, official folder trees) read with labels in the registry's order."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

import uniil.torchvision_fix  # noqa: F401 - before torchvision
import torchvision.datasets.cifar as tv_cifar  # noqa: E402
import torchvision.datasets.flowers102 as tv_flowers  # noqa: E402
from uniil.data.images import dataset_images  # noqa: E402
from uniil.data.registry import load_dataset_names  # noqa: E402
from uniil.errors import UserError  # noqa: E402


def img(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path, format="JPEG" if path.suffix.lower() in
                                                          (".jpg", ".jpeg") else "PNG")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def reg(dataset, name):
    return load_dataset_names(dataset).classes.index(name)


def names_of(src):
    return [src.classes[y] for y in src.labels]


@pytest.fixture(autouse=True)
def no_md5(monkeypatch):
    """The fakes are not the published files: keep torchvision's existence check, skip its md5."""
    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_flowers, "check_integrity", exists)


# ---- torchvision's formats --------------------------------------------------------------------------

def make_cifar(root, names=("worm", "apple", "aquarium_fish")):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 3)):
        ys = [i % len(names) for i in range(n)]
        data = np.stack([np.full(3072, 10 * y, np.uint8) for y in ys])  # the pixel value tells the label
        (d / split).write_bytes(pickle.dumps({"data": data, "fine_labels": ys, "coarse_labels": ys}))
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": list(names)}))


def idx_file(path, arr):
    arr = np.asarray(arr, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
                     + arr.tobytes())


def make_mnist(base):
    for prefix, ys in (("train", [3, 1, 4, 1, 5]), ("t10k", [9, 2, 6])):
        idx_file(base / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", [np.full((28, 28), 20 * y) for y in ys])
        idx_file(base / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", ys)
    return {"train": ["3 - three", "1 - one", "4 - four", "1 - one", "5 - five"],
            "test": ["9 - nine", "2 - two", "6 - six"]}


def make_flowers(base):
    d = base / "flowers-102"
    labels = [1, 2, 102, 1, 2, 102]
    for i in range(1, 7):
        img(d / "jpg" / f"image_{i:05d}.jpg")
    sio.savemat(d / "imagelabels.mat", {"labels": np.array(labels)})
    sio.savemat(d / "setid.mat", {"trnid": np.array([1, 2, 3]), "valid": np.array([4]), "tstid": np.array([5, 6])})
    return {"train": ["pink primrose", "hard-leaved pocket orchid", "blackberry lily"],
            "test": ["hard-leaved pocket orchid", "blackberry lily"]}


def make_food(base):
    d = base / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "baklava": ["baklava/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "baklava": ["baklava/5"]}}
    for split, m in meta.items():
        write(d / "meta" / f"{split}.json", json.dumps(m))
        for paths in m.values():
            for p in paths:
                img(d / "images" / f"{p}.jpg")
    return {"train": ["apple pie", "apple pie", "baklava"], "test": ["apple pie", "baklava"]}


def make_dtd(base):
    d = base / "dtd" / "dtd"
    rows = {"train": ["zigzagged/z_1.jpg", "banded/b_1.jpg"], "val": ["banded/b_2.jpg"], "test": ["zigzagged/z_3.jpg"]}
    for split, files in rows.items():
        write(d / "labels" / f"{split}1.txt", "\n".join(files) + "\n")
        for f in files:
            img(d / "images" / f)
    return {"train": ["zigzagged", "banded"], "test": ["zigzagged"]}


def make_pet(base):
    d = base / "oxford-iiit-pet"
    rows = {"trainval": [("Abyssinian_1", 1), ("american_bulldog_2", 2), ("american_pit_bull_terrier_3", 3)],
            "test": [("american_bulldog_4", 2), ("Abyssinian_5", 1), ("american_pit_bull_terrier_6", 3)]}
    for split, items in rows.items():
        write(d / "annotations" / f"{split}.txt", "".join(f"{i} {c} 1 1\n" for i, c in items))
        for i, _ in items:
            img(d / "images" / f"{i}.jpg")
    return {"train": ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"],
            "test": ["American Bulldog", "Abyssinian", "American Pit Bull Terrier"]}


def make_cars(base):
    d = base / "stanford_cars"
    names = np.array(["Acura RL Sedan 2012", "AM General Hummer SUV 2000", "Acura TL Sedan 2012"], dtype=object)
    (d / "devkit").mkdir(parents=True)
    sio.savemat(d / "devkit" / "cars_meta.mat", {"class_names": names})

    def annos(path, folder, rows):
        a = np.zeros(len(rows), dtype=[("fname", "O"), ("class", "O")])
        for k, (f, c) in enumerate(rows):
            a[k] = (f, c)
            img(d / folder / f)
        sio.savemat(path, {"annotations": a})

    annos(d / "devkit" / "cars_train_annos.mat", "cars_train", [("00001.jpg", 1), ("00002.jpg", 2)])
    annos(d / "cars_test_annos_withlabels.mat", "cars_test", [("00001.jpg", 3), ("00002.jpg", 1)])
    return {"train": ["Acura RL Sedan 2012", "AM General Hummer SUV 2000"],
            "test": ["Acura TL Sedan 2012", "Acura RL Sedan 2012"]}


def make_aircraft(base):
    d = base / "fgvc-aircraft-2013b" / "data"
    write(d / "variants.txt", "F/A-18\n707-320\n")
    rows = {"train": [("0001", "F/A-18"), ("0002", "707-320")], "val": [("0003", "707-320")],
            "test": [("0004", "F/A-18")]}
    for split, items in rows.items():
        write(d / f"images_variant_{split}.txt", "".join(f"{i} {c}\n" for i, c in items))
        for i, _ in items:
            img(d / "images" / f"{i}.jpg")
    return {"train": ["F/A-18", "707-320"], "test": ["F/A-18"]}


# Datasets torchvision ships no split of: everything is built, then split 80/20 by seed.
def make_caltech(base):
    d = base / "caltech101" / "101_ObjectCategories"
    folders = {"BACKGROUND_Google": None, "Faces": "off-center face", "Faces_easy": "centered face",
               "accordion": "accordion", "yin_yang": "yin and yang symbol"}
    for folder in folders:
        for i in range(1, 6):
            img(d / folder / f"image_{i:04d}.jpg")
    return {"all": [n for n in folders.values() if n for _ in range(5)]}


def make_eurosat(base):
    for folder in ("AnnualCrop", "SeaLake"):
        for i in range(5):
            img(base / "eurosat" / "2750" / folder / f"{folder}_{i}.jpg")
    return {"all": ["annual crop land"] * 5 + ["lake or sea"] * 5}


def make_sun(base):
    d = base / "SUN397"
    write(d / "ClassName.txt", "/a/abbey\n/a/apartment_building/outdoor\n")
    for i in range(5):
        img(d / "a" / "abbey" / f"sun_a{i}.jpg")
        img(d / "a" / "apartment_building" / "outdoor" / f"sun_b{i}.jpg")
    return {"all": ["abbey"] * 5 + ["apartment building/outdoor"] * 5}


TORCHVISION_FAKES = {"mnist": make_mnist, "flowers102": make_flowers, "food101": make_food, "dtd": make_dtd,
                     "oxford_pet": make_pet, "stanford_cars": make_cars, "aircraft": make_aircraft,
                     "caltech101": make_caltech, "eurosat": make_eurosat, "sun397": make_sun}


def test_cifar100_labels_follow_the_registry_by_name(tmp_path):
    make_cifar(tmp_path / "cifar100")
    src = dataset_images("cifar100", "train", None, tmp_path)
    assert src.labels == [99, 0, 1] * 2 and names_of(src)[:3] == ["worm", "apple", "aquarium fish"]
    assert [src.load(i).getpixel((0, 0)) for i in range(3)] == [(0, 0, 0), (10, 10, 10), (20, 20, 20)]
    assert src.load(0).mode == "RGB" and src.dataset == "cifar100" and src.domain == "photo"
    test = dataset_images("cifar100", "test", None, tmp_path)
    assert len(test) == 3 and test.cache_key and test.cache_key != src.cache_key
    assert dataset_images("cifar100", "train", None, tmp_path).cache_key == src.cache_key
    assert dataset_images("cifar100", "train", None, tmp_path, limit=2).cache_key is None


def test_a_shared_torchvision_root_and_mismatched_names(tmp_path):
    make_cifar(tmp_path)  # tmp_path/cifar-100-python, as torchvision itself keeps it
    assert dataset_images("cifar100", "test", None, tmp_path).labels == [99, 0, 1]
    make_cifar(tmp_path / "x" / "cifar100", names=("apple", "dragonfruit"))
    with pytest.raises(UserError, match="'dragonfruit' match no class of dataset cifar100") as err:
        dataset_images("cifar100", "test", None, tmp_path / "x")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(TORCHVISION_FAKES))
def test_torchvision_sets_map_labels_to_the_registry(tmp_path, name):
    expected = TORCHVISION_FAKES[name](tmp_path / name)
    if "all" in expected:  # seeded split: deterministic, disjoint, together everything
        train, test = (dataset_images(name, s, None, tmp_path) for s in ("train", "test"))
        assert sorted(names_of(train) + names_of(test)) == sorted(expected["all"])
        assert not set(train.keys) & set(test.keys) and len(test) == len(expected["all"]) // 5
        assert dataset_images(name, "train", None, tmp_path).keys == train.keys
        with pytest.raises(UserError, match="no split 'val'"):
            dataset_images(name, "val", None, tmp_path)
        sources = [train, test]
    else:
        sources = [dataset_images(name, split, None, tmp_path) for split in expected]
        for src, want in zip(sources, expected.values()):
            assert sorted(names_of(src)) == sorted(want), src.split
    for src in sources:
        assert src.load(0).mode == "RGB" and src.cache_key and len(src.classes) == len(load_dataset_names(name).classes)


def test_mnist_images_match_their_labels(tmp_path):
    make_mnist(tmp_path / "mnist")
    src = dataset_images("mnist", "train", None, tmp_path)
    assert src.labels == [3, 1, 4, 1, 5] and src.load(2).getpixel((0, 0)) == (80, 80, 80)


# ---- official folder layouts ------------------------------------------------------------------------

def make_office_home(data_root, n=5):
    base = data_root / "office-home" / "OfficeHomeDataset_10072016"
    for domain in ("Art", "Real World"):
        for folder in ("Alarm_Clock", "TV", "ToothBrush"):
            for i in range(n):
                img(base / domain / folder / f"{i:05d}.jpg")
    return base


def test_office_home_seeded_split(tmp_path):
    base = make_office_home(tmp_path)
    train, test = (dataset_images("office-home", s, "real world", tmp_path) for s in ("train", "test"))
    assert len(train) == 12 and len(test) == 3 and not set(train.keys) & set(test.keys)
    assert sorted(set(test.labels)) == sorted([reg("office-home", c) for c in ("alarm clock", "tv", "toothbrush")])
    assert all("Real World" in k for k in train.keys) and train.domain == "real world"
    again = dataset_images("office-home", "train", "real world", tmp_path)
    assert again.keys == train.keys and again.cache_key == train.cache_key != test.cache_key
    assert all("/Art/" in k for k in dataset_images("office-home", "test", "art", tmp_path).keys)
    before = {src.split: src.cache_key for src in (train, test)}
    changed = base / "Real World" / "TV" / "00000.jpg"
    Image.new("RGB", (9, 9), "red").save(changed, format="JPEG")  # an edited image: its split's key is new
    after = {s: dataset_images("office-home", s, "real world", tmp_path).cache_key for s in before}
    holder = "train" if str(changed) in train.keys else "test"
    assert {s: after[s] != before[s] for s in before} == {s: s == holder for s in before}
    with pytest.raises(UserError, match="unknown domain 'watercolor' of dataset office-home"):
        dataset_images("office-home", "test", "watercolor", tmp_path)


def test_tinyimagenet_official_layout(tmp_path):
    root = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    ids = load_dataset_names("tinyimagenet").class_ids
    for w in (ids[5], ids[0]):
        for i in range(2):
            img(root / "train" / w / "images" / f"{w}_{i}.JPEG")
        write(root / "train" / w / f"{w}_boxes.txt", "")
    rows = [("val_0.JPEG", ids[5]), ("val_1.JPEG", ids[0]), ("val_2.JPEG", ids[5])]
    write(root / "val" / "val_annotations.txt", "".join(f"{f}\t{w}\t0\t0\t3\t3\n" for f, w in rows))
    for f, _ in rows:
        img(root / "val" / "images" / f)
    img(root / "test" / "images" / "test_0.JPEG")  # unlabelled: never read
    train = dataset_images("tinyimagenet", "train", None, tmp_path)
    assert train.labels == [0, 0, 5, 5] and all("/images/" in k for k in train.keys)
    test = dataset_images("tinyimagenet", "test", None, tmp_path)
    assert list(zip(test.labels, [k.rsplit("/", 1)[1] for k in test.keys])) == \
        [(0, "val_1.JPEG"), (5, "val_0.JPEG"), (5, "val_2.JPEG")]
    assert dataset_images("tinyimagenet", "val", None, tmp_path).keys == test.keys
    with pytest.raises(UserError, match="splits train and test"):
        dataset_images("tinyimagenet", "holdout", None, tmp_path)


def test_imagenet_r_seeded_split_by_wnid(tmp_path):
    ids = load_dataset_names("imagenet-r").class_ids
    for w in (ids[199], ids[3]):
        for i, style in enumerate(["art", "cartoon", "sketch", "toy", "origami"] * 2):
            img(tmp_path / "imagenet-r" / "imagenet-r" / w / f"{style}_{i}.jpg")
    train, test = (dataset_images("imagenet-r", s, None, tmp_path) for s in ("train", "test"))
    assert len(train) == 16 and len(test) == 4 and sorted(set(test.labels)) == [3, 199]
    assert not set(train.keys) & set(test.keys)
    assert dataset_images("imagenet-r", "test", "sketch", tmp_path).keys == test.keys  # renditions are mixed


def test_domainnet_official_split_files_and_folder_layout(tmp_path):
    base = tmp_path / "domainnet"
    rows = {"train": ["real/train/real_001.jpg", "real/The_Eiffel_Tower/real_002.jpg"],
            "test": ["real/aircraft_carrier/real_003.jpg"]}
    for split, files in rows.items():
        write(base / f"real_{split}.txt", "".join(f"{f} 0\n" for f in files))
        for f in files:
            img(base / f)
    train = dataset_images("domainnet", "train", "real", tmp_path)
    assert sorted(names_of(train)) == ["The Eiffel Tower", "train"]
    assert names_of(dataset_images("domainnet", "test", "real", tmp_path)) == ["aircraft carrier"]
    for c in ("zigzag", "airplane"):
        img(base / "sketch" / "test" / c / "1.png")
    assert dataset_images("domainnet", "test", "sketch", tmp_path).labels == [1, 344]
    with pytest.raises(UserError, match="dataset domainnet \\(test, clipart\\) not found"):
        dataset_images("domainnet", "test", "clipart", tmp_path)


def test_image_folder_layout_of_a_registry_dataset_uses_registry_order(tmp_path):
    for c in ("worm", "apple", "aquarium_fish"):
        img(tmp_path / "cifar100" / "test" / c / "a.png")
    src = dataset_images("cifar100", "test", None, tmp_path)
    assert src.labels == [0, 1, 99] and len(src.classes) == 100
    img(tmp_path / "cifar100" / "test" / "dragonfruit" / "a.png")
    with pytest.raises(UserError, match="'dragonfruit' match no class"):
        dataset_images("cifar100", "test", None, tmp_path)


@pytest.mark.parametrize("name, hint", [("cifar100", "--download"), ("caltech101", "--download"),
                                        ("domainnet", "M3SDA"), ("office-home", "OfficeHomeDataset"),
                                        ("imagenet-r", "hendrycks"), ("tinyimagenet", "tiny-imagenet-200")])
def test_missing_dataset_is_a_one_line_error_with_the_layout(tmp_path, name, hint):
    with pytest.raises(UserError) as err:
        dataset_images(name, "test", None, tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and "not found" in msg and "--data-root DIR" in msg and hint in msg
    assert str(tmp_path / "nowhere" / name) in msg and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("method", ["finetune", "zeroshot"])  # images through the tower / cached features
def test_an_unreadable_image_in_a_step_is_a_one_line_error(tmp_path, method):
    from conftest import run_cli

    base = make_office_home(tmp_path / "root")
    for f in (base / "Real World" / "TV").iterdir():
        f.write_bytes(b"not a jpeg")  # whichever split it falls in, the one-step run reads it
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: broken\nsteps:\n  - {dataset: office-home, classes: [alarm clock, tv, toothbrush], "
                        "domain: real world}\n")
    r = run_cli("train", "--scenario", scenario, "--method", method, "--clip-model", "uniil-tiny",
                "--data-root", tmp_path / "root", "--out", tmp_path / "run")
    assert r.code == 1 and "cannot be read, e.g." in r.err and "TV" in r.err and "fix or remove them" in r.err, r.err
    assert "Traceback" not in r.err and not (tmp_path / "run" / "metrics.json").exists()
