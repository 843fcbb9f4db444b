"""The layers read top-down: cli -> trainer -> attrpool -> backbones -> data, with `common`
and `errors` (which import no other uniil module) usable by all. No import may run upward."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
ORDER = ["cli", "trainer", "attrpool", "backbones", "data", "prompts"]
NEUTRAL = {"common", "errors", "typed_options", "torchvision_fix", "__init__"}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """uniil modules imported by `path` (relative and absolute), as dotted names below `uniil`."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.startswith("uniil."):
                names = [node.module[len("uniil."):]]
            else:
                continue
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("uniil."):] for a in node.names if a.name.startswith("uniil."))
    return found


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", ".venv", "build") or rel.parts[0].startswith("."):
            continue
        yield path, _layer(".".join(rel.with_suffix("").parts))


def test_no_import_runs_upward():
    upward = []
    for path, layer in _modules():
        for target in _imports(path):
            other = _layer(target)
            if layer in NEUTRAL:
                if other not in NEUTRAL:  # the neutral modules import no layer at all
                    upward.append(f"{path.relative_to(ROOT)} -> {target}")
                continue
            if other in NEUTRAL or other == layer:
                continue
            if other in ORDER and ORDER.index(other) < ORDER.index(layer):
                upward.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not upward, "imports that run upward: " + "; ".join(upward)


def test_no_module_shadows_a_top_level_package():
    """`from ..data import x` inside trainer/ must never mean anything but uniil.data."""
    top = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    shadows = [str(p.relative_to(ROOT)) for p, _ in _modules()
               if len(p.relative_to(ROOT).parts) > 1 and p.stem in top]
    assert not shadows, f"modules named like a top-level package: {shadows}"


def test_one_atomic_write():
    """Every write-to-a-temporary-file-then-rename goes through uniil.common (one implementation)."""
    offenders = []
    for path, layer in _modules():
        if layer == "common":
            continue
        code = [ln.split("#", 1)[0] for ln in path.read_text(encoding="utf-8").splitlines()]
        if any(re.search(r"""\.tmp\b|tmp\.replace\(|tmp\.rename\(""", ln) for ln in code):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"atomic writes outside uniil.common: {offenders}"
