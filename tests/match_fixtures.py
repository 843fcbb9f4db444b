"""Fixtures shared by the match tests: a small pool built against the loopback server, and images."""

from __future__ import annotations

import pytest

from conftest import run_cli, server_args
from llm_server import FakeLLMServer

CLASSES = ["circle", "star", "heart", "house"]
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    classes = tmp / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    path = tmp / "p.duckdb"
    with FakeLLMServer(n_attributes=6) as server:
        r = run_cli("attrs", "build", "--pool", path, "--classes", classes, "--domains", "sketch,photo",
                    "--templates", "class-appearance,domain-style", *server_args(server))
    assert r.code == 0, r.err
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from uniil.data.synthetic import SyntheticDataset

    folder = tmp_path_factory.mktemp("images")
    ds = SyntheticDataset("test", "photo", n_per_class=1, classes=CLASSES)
    for i in range(len(ds)):
        ds[i][0].save(folder / f"img{i}.png")
    return folder
