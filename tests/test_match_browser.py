"""The HTML match report as a person sees it: rendered by headless Chromium (Debian's chromium)."""

from __future__ import annotations

import json
import re

import pytest

from browser import chromium
from conftest import run_cli
from match_fixtures import images, pool  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser


def test_report_renders_every_image_and_attribute(pool, images, tmp_path):
    page = tmp_path / "report.html"
    r = run_cli("attrs", "match", images, "--pool", pool, "--top-k", "3", "--json", "--html", page)
    assert r.code == 0, r.err
    found = json.loads(r.out)
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), user_dir=tmp_path / "chrome")
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert loaded and int(loaded.group(1)) == len(found) == 4  # every thumbnail decoded and displayed
    shown = re.findall(r"<td class=\"attr\">(.*?)</td>", dom)
    assert len(shown) == sum(len(f["matches"]) for f in found)
    for f in found:
        assert f["image"] in dom
        for m in f["matches"]:
            assert m["attribute"] in shown
    shot = tmp_path / "report.png"
    chromium("--window-size=1000,900", f"--screenshot={shot}", page.as_uri(), user_dir=tmp_path / "chrome2")
    assert shot.stat().st_size > 5000
