"""CLIP backbones by name, as open_clip's factory does: open_clip models plus built-in offline ones."""

from .spec import BUILTIN_MODELS, BackboneSpec

__all__ = ["BUILTIN_MODELS", "BackboneSpec"]
