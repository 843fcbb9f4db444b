"""Naming a backbone without importing torch: the CLI and the pool compare these cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"
# Built-in backbones are defined by a config in model_configs/ and a fixed seed: no download.
RANDOM_BUILTINS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
# Trained offline on the synthetic world (backbones/micro.py); the version names the recipe. Their
# weights ship in backbones/weights/ (a checkout without them trains them on first use, into the cache).
TRAINED_BUILTINS = {"uniil-micro": 4}
SHIPPED_DIR = Path(__file__).parent / "weights"
BACKBONE_DIR_ENV = "UNIIL_BACKBONE_DIR"  # where trained built-ins live (default: <cache dir>/backbones)
BUILTIN_MODELS = RANDOM_BUILTINS + tuple(TRAINED_BUILTINS)
BUILTIN_SEED = 0
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"


@dataclass(frozen=True)
class BackboneSpec:
    """`model` is an open_clip name or a built-in one; `pretrained` an open_clip tag, a checkpoint
    path, or "none" for random weights. Built-in models have no pretrained tag; a trained built-in
    takes a weights file of its own version (`uniil backbone build --force` writes one)."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED

    @classmethod
    def from_options(cls, model: str | None, pretrained: str | None) -> "BackboneSpec":
        model = model or DEFAULT_MODEL
        if model in TRAINED_BUILTINS and pretrained not in (None, "", "none"):
            path = Path(pretrained).expanduser()
            if not path.is_file():
                from ..errors import UserError

                raise UserError(f"no weights file {pretrained} for {model}; pass a .safetensors file that "
                                f"`uniil backbone build {model} --force` wrote, or leave --clip-pretrained out "
                                "for the shipped weights")
            return cls(model, str(path.resolve()))
        if model in BUILTIN_MODELS:
            return cls(model, None)
        if pretrained is None:
            pretrained = DEFAULT_PRETRAINED
        if pretrained not in ("none", "") and Path(pretrained).expanduser().exists():
            pretrained = str(Path(pretrained).expanduser().resolve())
        return cls(model, pretrained or "none")

    @property
    def is_builtin(self) -> bool:
        return self.model in BUILTIN_MODELS

    @property
    def id(self) -> str:
        """Stable identity recorded in pools and caches; two specs with equal ids give equal features."""
        if self.model in TRAINED_BUILTINS:
            own = f":{self.pretrained}" if self.pretrained else ""
            return f"{self.model}@v{TRAINED_BUILTINS[self.model]}{own}"
        if self.is_builtin:
            return f"{self.model}@seed{BUILTIN_SEED}"
        return f"{self.model}@{self.pretrained}"

    def trained_weights(self) -> Path | None:
        """The weights file a trained built-in backbone loads (None for every other backbone): the one
        given, else the shipped one, else (a checkout without it) the one trained into the cache."""
        if self.model not in TRAINED_BUILTINS:
            return None
        if self.pretrained:
            return Path(self.pretrained)
        shipped = self.shipped_weights()
        return shipped if shipped.exists() else self.cached_weights()

    def shipped_weights(self) -> Path:
        return SHIPPED_DIR / f"{self.model}-v{TRAINED_BUILTINS[self.model]}.safetensors"

    def cached_weights(self) -> Path:
        """Where `uniil backbone build` (and training on first use) writes a trained built-in."""
        import os

        from ..common import cache_dir

        folder = Path(os.environ[BACKBONE_DIR_ENV]) if os.environ.get(BACKBONE_DIR_ENV) else cache_dir() / "backbones"
        return folder / f"{self.model}-v{TRAINED_BUILTINS[self.model]}.safetensors"

    def cli_options(self) -> str:
        if self.is_builtin and not self.pretrained:
            return f"--clip-model {self.model}"
        return f"--clip-model {self.model} --clip-pretrained {self.pretrained}"
