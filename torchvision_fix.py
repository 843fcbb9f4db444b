"""Make `import torchvision` (and open_clip, sentence-transformers) work on a CPU-only torch.

torchvision's wheel can be a CUDA build whose compiled ops (`torchvision::nms`, ...) fail to load
against a CPU torch; its Python side then dies registering fake kernels for ops that do not exist.
Declaring the two schemas it needs first lets the pure-Python parts (transforms, PIL loading)
import. Where the compiled ops load, this does nothing. Import this module before torchvision.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_LIBRARY = None  # kept alive: a torch.library.Library unregisters its ops when collected


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to fix
    pkg_dir = list(spec.submodule_search_locations)[0]
    for lib in glob.glob(os.path.join(pkg_dir, "_C*.so")) + glob.glob(os.path.join(pkg_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(lib)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def apply() -> None:
    global _LIBRARY
    if _LIBRARY is not None or _compiled_ops_load():
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already declared by someone else
        return
    except (AttributeError, RuntimeError):
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


apply()
