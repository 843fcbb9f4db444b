"""Backbones by name, the torchvision import fix, and the pool's backbone identity."""

import numpy as np

from uniil.backbones.spec import BackboneSpec


def test_torchvision_imports_on_this_torch():
    import uniil.torchvision_fix  # noqa: F401
    import open_clip
    import torchvision
    from torchvision import transforms

    assert transforms.ToTensor() is not None and open_clip.list_models() and torchvision.__version__


def test_uniil_tiny_is_seeded_and_normalised():
    from uniil.backbones.factory import load_backbone

    spec = BackboneSpec.from_options("uniil-tiny", None)
    a = load_backbone(spec).encode_text(["red circle", "blue star"])
    b = load_backbone(spec).encode_text(["red circle", "blue star"])
    assert a.shape == (2, 128) and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert not np.allclose(a[0], a[1])


def test_spec_identity():
    assert BackboneSpec.from_options(None, None).id == "ViT-B-16@openai"
    assert BackboneSpec.from_options("uniil-tiny", "openai").id == "uniil-tiny@seed0"  # built-ins take no tag
    assert BackboneSpec.from_options("ViT-B-32", "none").cli_options() == "--clip-model ViT-B-32 --clip-pretrained none"
