"""Headless Chromium (Debian's chromium) for the tests that check a page as a person sees it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args: str, user_dir) -> str:
    """Run chromium with `args`; its stdout (e.g. the DOM of --dump-dom)."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium (apt-get install chromium)")
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
