"""`uniil-micro`: trained offline on the synthetic world, shipped with the package. The evidence
the README records is computed here from the renderer's ground truth on the shipped weights:
zero-shot accuracy by class name and by the reference descriptions (none of whose phrases is in
any pre-training caption), colour and domain phrases among an image's top-5 matches, and a phrase
never seen in captions landing near the right images. The training recipe itself runs here only
as a short smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli
from uniil.backbones.spec import BackboneSpec
from uniil.data.synthetic import COLOURS, DOMAINS, SyntheticDataset, class_names

HELD_IN = ("photo", "clipart")
PER_CLASS = 10


@pytest.fixture(scope="module")
def micro():
    from uniil.backbones.factory import load_backbone

    return load_backbone(BackboneSpec.from_options("uniil-micro", None))


@pytest.fixture(scope="module")
def test_sets(micro):
    """Per domain: (features [N, D], labels [N], truths)."""
    out = {}
    for domain in DOMAINS:
        ds = SyntheticDataset("test", domain, n_per_class=PER_CLASS)
        rendered = [ds.render(i) for i in range(len(ds))]
        feats = micro.encode_images([img for img, _ in rendered])
        out[domain] = (feats, np.asarray([ds.labels[i // PER_CLASS] for i in range(len(ds))]), [t for _, t in rendered])
    return out


def _accuracy(micro, feats, labels) -> float:
    text = micro.encode_text([f"a photo of a {c}." for c in class_names()])
    return float((np.argmax(feats @ text.T, axis=1) == labels).mean() * 100)


@pytest.mark.slow
def test_zero_shot_is_good_on_held_in_domains_and_imperfect_elsewhere(micro, test_sets):
    acc = {d: _accuracy(micro, *test_sets[d][:2]) for d in DOMAINS}
    chance = 100 / len(class_names())
    assert acc["photo"] >= 70, acc  # issue 14's target; v4 measures 86.7 (README), v3 71.7, v2 63.8
    for d in HELD_IN:
        assert acc[d] >= 60, acc
    assert all(acc[d] < 100 for d in DOMAINS), acc  # room to learn in every domain
    assert min(acc[d] for d in DOMAINS if d not in HELD_IN) < min(acc[d] for d in HELD_IN), acc
    assert all(acc[d] > chance for d in DOMAINS), acc


def _top5_hits(micro, feats, phrases, truth_index) -> float:
    emb = micro.encode_text(phrases)
    top5 = np.argsort(-(feats @ emb.T), axis=1)[:, :5]
    return float(np.mean([truth_index[i] in top5[i] for i in range(len(feats))]) * 100)


@pytest.mark.slow
def test_attribute_matches_are_meaningful(micro, test_sets):
    """A pool of ground-truth style phrases: colours, textures, sizes and styles, scored as the
    pool's exact index scores them (inner product of normalised embeddings)."""
    colours = [f"{c} colour" for c in COLOURS]
    textures = ["solid texture", "striped texture", "dotted texture", "checkered texture"]
    sizes = ["small size", "medium size", "large size"]
    styles = [f"{d} style" for d in DOMAINS]
    phrases = colours + textures + sizes + styles
    colour_hits = []
    for d in HELD_IN:
        feats, _, truths = test_sets[d]
        colour_hits.append(_top5_hits(micro, feats, phrases, [colours.index(f"{t.colour} colour") for t in truths]))
    assert np.mean(colour_hits) >= 80, colour_hits
    feats = np.concatenate([test_sets[d][0] for d in DOMAINS])
    truth = [len(colours + textures + sizes) + DOMAINS.index(d) for d in DOMAINS for _ in test_sets[d][2]]
    assert _top5_hits(micro, feats, phrases, truth) >= 80


@pytest.mark.slow
def test_a_phrase_never_seen_in_captions_lands_near_the_right_images(micro, test_sets):
    """MiniLM knows that a circle is round, though no caption ever said "round"."""
    feats, labels, _ = test_sets["photo"]
    names = list(class_names())
    score = feats @ micro.encode_text(["a round object"])[0]
    round_ = np.isin(labels, [names.index(c) for c in ("circle", "ring", "ellipse")])
    angular = np.isin(labels, [names.index(c) for c in ("square", "triangle", "rectangle", "diamond")])
    assert score[round_].mean() > score[angular].mean()


@pytest.mark.slow
def test_the_reference_descriptions_classify_though_no_caption_says_them(micro, test_sets):
    """Classification by description with the reference annotator's attributes, though not one of
    those phrases is in a caption: v4 measures 57.9% on photo and 60.8% on clipart here (10 images
    a class; 54.4 and 61.0 on 20, README); on 20 a class v3 had 48.3 on photo, v2 11.3."""
    from uniil.backbones.micro_eval import description_prototypes, reference_attributes

    reference = reference_attributes()
    protos = description_prototypes(micro, reference)
    acc = {d: float((np.argmax(test_sets[d][0] @ protos.T, axis=1) == test_sets[d][1]).mean() * 100)
           for d in HELD_IN}
    assert acc["photo"] >= 50 and acc["clipart"] >= 50, acc  # issue 14's target: 50 on photo
    # each phrase on its own: on average it ranks its own class's photos above the others'
    feats, labels, _ = test_sets["photo"]
    names = list(class_names())
    phrases = [(c, p) for c in names for p in reference[c]]
    scores = feats @ micro.encode_text([p for _, p in phrases]).T  # [N, P]
    above = [scores[labels == names.index(c), j].mean() > scores[labels != names.index(c), j].mean()
             for j, (c, _) in enumerate(phrases)]
    assert np.mean(above) >= 0.8, np.mean(above)


def test_no_caption_contains_a_reference_phrase():
    """The reference pool is held out of pre-training: none of its phrases occurs in a caption,
    even as a part of one (case-insensitive)."""
    from uniil.backbones.micro_captions import caption_world
    from uniil.backbones.micro_eval import reference_attributes

    texts = [t.lower() for t in caption_world().texts]
    phrases = {p.lower() for ps in reference_attributes().values() for p in ps}
    import json
    from importlib import resources

    domains = json.loads(resources.files("uniil.data").joinpath("attributes/synthetic.json").read_text())["domains"]
    phrases |= {p.lower() for ps in domains.values() for p in ps}
    assert len(phrases) > 130  # distinct phrases: 169 in all, some said of several classes
    assert not [p for p in phrases if any(p in t for t in texts)]


def test_an_attribute_caption_is_true_of_every_class_with_the_fact():
    """Soft targets: "6 sides" is true of the hexagon and the chevron, of every colour and domain;
    "a red shape with 6 sides." only of red ones; a naming caption of its own class only."""
    from uniil.backbones.micro_captions import FIELDS, caption_world, field_values, sample_caption

    w = caption_world()
    names = list(class_names())
    six = w.index["6 sides"]
    assert [names[i] for i in np.flatnonzero(w.shape_mask[six])] == ["hexagon", "chevron"]
    v = field_values()
    hexagon_red = np.asarray([[names.index("hexagon"), 0, 0, 0, 0]])
    chevron_blue = np.asarray([[names.index("chevron"), v["colour"].index("blue"), 1, 2, 1]])
    star = np.asarray([[names.index("star"), 0, 0, 0, 0]])
    caps = np.asarray([six, w.index["a red shape with 6 sides."], w.index["a hexagon."]])
    truth = w.truth(caps, np.concatenate([hexagon_red, chevron_blue, star]))
    assert truth.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    rng = np.random.default_rng(0)
    for code in ([names.index("ring"), 3, 1, 0, 0], [names.index("kite"), 5, 2, 1, 1], [3, 2, 1, 0, 2]):
        code = np.asarray(code)
        drawn = [sample_caption(w, code, rng) for _ in range(200)]
        assert w.truth(np.asarray(drawn), code[None])[0].all()  # every caption drawn is true of its image
    assert len(FIELDS) == w.codes.shape[1]


def test_training_is_seeded_and_deterministic(tmp_path, monkeypatch):
    """Two trainings with the same recipe give bit-identical weights (a short recipe, to be quick)."""
    from uniil.backbones import micro_train

    recipe = micro_train.Recipe(images=256, epochs=1, batch_size=64)
    a = micro_train.train(recipe).state_dict()
    b = micro_train.train(recipe).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from uniil.backbones.micro_captions import caption_world

    w = caption_world()
    assert len(w.texts) == len(set(w.texts)) == len(w.index) and w.codes.shape == (len(w.texts), 5)


def test_rendering_in_two_processes_gives_the_same_pretraining_set():
    """The renderer's processes split the images, each from its own seed: the set does not depend on
    how many there are (so the recipe retrains the same weights on any machine)."""
    from uniil.backbones import micro_train

    recipe = micro_train.Recipe(images=300)
    one, truth_one = micro_train.render_pretraining_set(recipe, 64, workers=1)
    two, truth_two = micro_train.render_pretraining_set(recipe, 64, workers=2)
    assert torch.equal(one, two) and np.array_equal(truth_one, truth_two)
    assert one.abs().sum(dim=(1, 2, 3)).min() > 0  # every image rendered, none left empty
    assert set(truth_one[:, 4]) == set(range(len(DOMAINS)))


def test_dihedral_augmentation_turns_or_mirrors_each_image():
    from uniil.backbones.micro_train import dihedral

    x = torch.randn(64, 3, 8, 8)
    y = dihedral(x, torch.Generator().manual_seed(0))
    variants = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]  # each [64, 3, 8, 8]
    which = [next(t for t in range(8) if torch.equal(y[i], variants[t][i])) for i in range(len(x))]
    assert len(set(which)) == 8  # all eight used, each image one of its own
    assert torch.equal(dihedral(x, torch.Generator().manual_seed(0)), y)  # seeded


def test_the_shipped_weights_are_checked_and_older_versions_refused(tmp_path):
    """The package's weights match the checksum the release recorded; a damaged copy, another
    version's file and a missing file are one-line errors naming the fix."""
    from safetensors.torch import load_file, save_file

    from uniil.backbones import micro
    from uniil.backbones.factory import load_backbone
    from uniil.errors import UserError

    spec = BackboneSpec.from_options("uniil-micro", None)
    shipped = spec.shipped_weights()
    assert spec.trained_weights() == shipped and micro.sha256(shipped) == micro.SHIPPED_SHA256
    assert spec.id == f"uniil-micro@v{micro.VERSION}"
    older = micro.VERSION - 1
    old = tmp_path / f"uniil-micro-v{older}.safetensors"
    save_file(load_file(str(shipped)), str(old), metadata={"version": str(older)})
    with pytest.raises(UserError, match=rf"are uniil-micro v{older}, this uniil's uniil-micro is v{micro.VERSION}"):
        load_backbone(BackboneSpec.from_options("uniil-micro", str(old)))
    with pytest.raises(UserError, match="no weights file"):
        BackboneSpec.from_options("uniil-micro", str(tmp_path / "missing.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="delete the file"):
        load_backbone(BackboneSpec.from_options("uniil-micro", str(broken)))
    damaged = bytearray(shipped.read_bytes())
    damaged[-1] ^= 1
    original = shipped.read_bytes()
    try:  # the shipped file itself, damaged in place (restored below)
        shipped.write_bytes(bytes(damaged))
        with pytest.raises(UserError, match="are damaged.*reinstall uniil"):
            load_backbone(spec)
    finally:
        shipped.write_bytes(original)


def test_backbone_build_command(tmp_path, monkeypatch):
    """`backbone build` says the weights ship; `--force` (here a short smoke recipe) trains into the
    cache and compares its figures with the shipped weights'; the result loads by path."""
    monkeypatch.setenv("UNIIL_BACKBONE_DIR", str(tmp_path))  # never touch the shared cache
    r = run_cli("backbone", "build", "uniil-nano")
    assert r.code == 1 and "unknown trained backbone 'uniil-nano'" in r.err
    r = run_cli("backbone", "build", "uniil-micro", "--images", "0")
    assert r.code == 1 and "--images must be at least 1" in r.err
    r = run_cli("backbone", "build", "uniil-micro")
    assert r.code == 0 and "ships with uniil" in r.out
    r = run_cli("backbone", "build", "uniil-micro", "--force", "--images", "192", "--epochs", "1", "--per-class", "2")
    assert r.code == 0, r.err
    rebuilt = BackboneSpec.from_options("uniil-micro", None).cached_weights()
    assert rebuilt.parent == tmp_path and rebuilt.exists()
    assert "a shorter recipe than the shipped one: 192 images, 1 epochs" in r.out
    rows = [line.split("│")[1:-1] for line in r.out.splitlines() if line.count("│") == 6]
    cells = {(k.strip(), d.strip()): (float(new), float(old), float(diff)) for k, d, new, old, diff in rows
             if d.strip() in DOMAINS}
    assert len(cells) == 2 * len(DOMAINS)
    for new, old, diff in cells.values():
        assert abs(new - old - diff) < 0.11
    new, old, _ = cells[("class names", "photo")]
    assert old >= 40 and old > new + 20  # the shipped weights, beside a model of one short epoch (2 images a class)
    assert f"--clip-pretrained {rebuilt}" in r.out
    from uniil.backbones.factory import load_backbone

    spec = BackboneSpec.from_options("uniil-micro", str(rebuilt))
    assert spec.id.endswith(str(rebuilt)) and load_backbone(spec).encode_text(["a star."]).shape == (1, 256)
