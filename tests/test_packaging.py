"""The installed package: one `uniil` namespace, with its data files (an editable install hides gaps)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_code_and_data_under_one_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("uniil-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.startswith("uniil-")}
    assert top == {"uniil"}  # no top-level `data`, `trainer` or `cli` to collide with other packages
    data_files = [p.relative_to(ROOT).as_posix() for d in ("data", "prompts", "backbones/model_configs")
                  for p in (ROOT / d).rglob("*") if p.suffix in (".txt", ".yaml", ".json")]
    assert data_files and all(f"uniil/{f}" in names for f in data_files)
    assert "uniil/backbones/weights/uniil-micro-v4.safetensors" in names  # the shipped backbone
    assert "uniil/cli.py" in names and not any(n.startswith("uniil/tests/") for n in names)
    # every module, subpackages included (a package missing from pyproject's list is silently left out)
    modules = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
               if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks", "build", ".venv")]
    missing = [m for m in modules if f"uniil/{m}" not in names]
    assert not missing, f"modules not in the wheel: {missing}"


def test_documents_hold_no_control_characters():
    """A LaTeX command written in a non-raw Python string loses its backslash ("\\frac" becomes a
    form feed and "rac"): docs/methods.md's floor formula once rendered that way."""
    import re

    docs = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "RESULTS.md", *ROOT.glob("docs/*.md")]
    # tabs too ("\text" becomes one); split("\n"), as splitlines() would break the line at a form feed
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in docs for i, line in enumerate(p.read_text().split("\n"), 1)
           if re.search(r"[\x00-\x09\x0b\x0c\x0e-\x1f]", line)]
    assert len(docs) >= 4 and not bad, bad
