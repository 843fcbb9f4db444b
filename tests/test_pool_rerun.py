"""A build's tables row for row, and the finished rerun: it checks a fingerprint of the planned prompts
against the pool and stops, without planning a prompt or importing torch; anything new (a class, a
setting, a failed prompt) takes the full path and asks exactly what is new."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import duckdb
import pytest

from conftest import server_args
from llm_server import Fault, attributes_for, prompt_text

SHAPES = ["circle", "square", "star"]


@pytest.fixture
def classes(tmp_path):
    def write(names=SHAPES):
        f = tmp_path / f"classes{len(names)}.txt"
        f.write_text("\n".join(names) + "\n")
        return f
    return write


@pytest.fixture
def forbid_planning(monkeypatch):
    """From the call on, planning a single prompt fails the test: a finished rerun must not need to."""
    from uniil.attrpool import build

    def refuse(*args, **kwargs):
        raise AssertionError("a finished rerun planned its prompts")

    return lambda: monkeypatch.setattr(build, "plan_requests", refuse)


def reused(out: str) -> int:
    return int(re.search(r"answers reused from the pool\W+(\d+)", out).group(1))


def build_args(pool, classes_file, server, *extra):
    return ["attrs", "build", "--pool", pool, "--classes", classes_file, "--domains", "sketch,photo",
            "--templates", "class-appearance,class-identify,domain-style", *server_args(server, *extra)]


def test_a_build_records_every_prompt_answer_and_provenance_row_for_row(cli, llm_server, tmp_path, classes):
    from uniil.attrpool.normalize import normalize_phrase, usable_phrase
    from uniil.attrpool.parse import parse_attributes
    from uniil.attrpool.plan import plan_requests
    from uniil.data.registry import resolve_names
    from uniil.prompts.templates import load_templates

    pool = tmp_path / "p.duckdb"
    r = cli(*build_args(pool, classes(), llm_server, "--concurrency", "3"))
    assert r.code == 0, r.err
    names = resolve_names(None, classes(), ["sketch", "photo"])
    planned = plan_requests(names, load_templates(["class-appearance", "class-identify", "domain-style"]), 8,
                            "chat", "test-model")
    con = duckdb.connect(str(pool), read_only=True)
    assert con.execute("SELECT * FROM sources ORDER BY kind, position").fetchall() == [
        ("class", "circle", "classes3", 0), ("class", "square", "classes3", 1), ("class", "star", "classes3", 2),
        ("domain", "sketch", "classes3", 0), ("domain", "photo", "classes3", 1)]
    requests = con.execute("SELECT key, source_kind, source_name, template, form, model, n, payload, status "
                           "FROM requests ORDER BY key").fetchall()
    assert requests == sorted(r.row() + ("answered",) for r in planned)
    # One call per prompt, each the answer its request points at, holding what the server sent.
    calls = con.execute("SELECT c.id, c.request_key, c.status, c.response, c.attempt FROM llm_calls c "
                        "JOIN requests r ON r.answer_call = c.id ORDER BY c.id").fetchall()
    assert len(calls) == con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == len(planned) == 8
    assert sorted(c[0] for c in calls) == list(range(1, 9))
    sent = {json.dumps({"messages": e.body["messages"]}, sort_keys=True, ensure_ascii=False):
            attributes_for(prompt_text(e.body)) for e in llm_server.log}
    payload_of = {r.key: r.row()[7] for r in planned}
    for _, key, status, response, attempt in calls:
        assert (status, attempt) == ("ok", 0)
        assert json.loads(response) == {"attributes": sent[payload_of[key]]}
    # Provenance: every usable phrase of every answer, once, with its source, template and call.
    source_of = {r.key: (r.source_kind, r.source_name, r.template) for r in planned}
    expected = {(*source_of[key], raw.strip(), call_id) for call_id, key, _, response, _ in calls
                for raw in parse_attributes(response) if usable_phrase(normalize_phrase(raw), source_of[key][1])}
    provenance = con.execute("SELECT source_kind, source_name, template, raw_phrase, call_id, attribute_id "
                             "FROM provenance").fetchall()
    assert len(provenance) == len(expected) and {p[:5] for p in provenance} == expected
    texts = dict(con.execute("SELECT id, text FROM attributes").fetchall())
    assert {p[5] for p in provenance} == set(texts)  # every attribute has provenance, and only attributes do


def test_a_finished_rerun_stops_at_the_fingerprint(cli, llm_server, tmp_path, classes, forbid_planning):
    pool = tmp_path / "p.duckdb"
    assert cli(*build_args(pool, classes(), llm_server)).code == 0
    served = len(llm_server.log)
    before = pool.read_bytes()
    forbid_planning()
    r = cli(*build_args(pool, classes(), llm_server))
    assert r.code == 0, r.err
    assert len(llm_server.log) == served and reused(r.out) == 8 and "up to date" in r.out
    assert pool.read_bytes() == before  # opened read-only: not a byte written


def test_a_finished_rerun_loads_no_model_in_a_fresh_process(cli, llm_server, tmp_path, classes):
    pool = tmp_path / "p.duckdb"
    args = [str(a) for a in build_args(pool, classes(), llm_server)]
    assert cli(*args).code == 0
    served = len(llm_server.log)
    probe = ("import sys; from uniil.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print('HEAVY', [m for m in ('torch', 'open_clip', 'transformers', 'faiss', 'openai', 'numpy') "
             "if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout and "up to date" in proc.stdout
    assert len(llm_server.log) == served


@pytest.mark.parametrize("change, asked", [
    (["--dedupe-threshold", "0.8"], 0),  # derivation changes, prompts do not
    (["--per-class", "5"], 8),  # every prompt asks for another count: all asked again
    (["--templates", "class-appearance,domain-style"], 0),  # a subset: all answered already
])
def test_a_changed_setting_takes_the_full_path_then_the_shortcut(cli, llm_server, tmp_path, classes, change, asked,
                                                                 forbid_planning):
    pool = tmp_path / "p.duckdb"
    assert cli(*build_args(pool, classes(), llm_server)).code == 0
    served = len(llm_server.log)
    args = build_args(pool, classes(), llm_server)
    i = args.index(change[0]) if change[0] in args else len(args)
    changed = args[:i] + change + args[i + 2:] if change[0] in args else args + change
    r = cli(*changed)
    assert r.code == 0, r.err
    assert len(llm_server.log) == served + asked
    assert ("rebuilt" in r.out) == (change[0] == "--dedupe-threshold" or asked > 0)
    forbid_planning()
    r = cli(*changed)  # and now it is the finished one
    assert r.code == 0, r.err
    assert len(llm_server.log) == served + asked and "up to date" in r.out


def test_a_new_class_asks_exactly_its_prompts(cli, llm_server, tmp_path, classes):
    pool = tmp_path / "p.duckdb"
    assert cli(*build_args(pool, classes(), llm_server)).code == 0
    served = len(llm_server.log)
    r = cli(*build_args(pool, classes(SHAPES + ["heart"]), llm_server))
    assert r.code == 0, r.err
    new = llm_server.log[served:]
    assert len(new) == 2 and all("heart" in e.prompt for e in new)  # two class templates, nothing else


def test_a_failed_prompt_is_asked_again_by_the_next_run(cli, llm_server, tmp_path, classes, forbid_planning):
    llm_server.add_fault(Fault("empty", match="How can you identify a star", times=-1))
    pool = tmp_path / "p.duckdb"
    args = build_args(pool, classes(), llm_server, "--retries", "1")
    r = cli(*args)
    assert r.code == 0 and "star (1)" in r.out, r.err
    llm_server.faults.clear()
    served = len(llm_server.log)
    assert cli(*args).code == 0
    assert len(llm_server.log) == served + 1 and "identify a star" in llm_server.log[-1].prompt
    forbid_planning()
    assert cli(*args).code == 0
    assert len(llm_server.log) == served + 1


def test_a_pool_of_two_datasets_reruns_each_without_asking(cli, llm_server, tmp_path, classes, forbid_planning):
    pool = tmp_path / "p.duckdb"
    first, second = classes(), classes(["heart", "moon"])
    assert cli(*build_args(pool, first, llm_server)).code == 0
    assert cli(*build_args(pool, second, llm_server)).code == 0
    served = len(llm_server.log)
    # The second build logged calls after the first finished: the first's rerun checks, asks nothing...
    r = cli(*build_args(pool, first, llm_server))
    assert r.code == 0 and "up to date" in r.out, r.err
    forbid_planning()
    for names in (first, second):  # ...and from then on, both stop at their fingerprints
        r = cli(*build_args(pool, names, llm_server))
        assert r.code == 0, r.err
    assert len(llm_server.log) == served
    s = json.loads(cli("attrs", "stats", "--pool", pool, "--json").out)
    assert (s["classes"], s["llm_calls"]) == (5, 8 + 4)  # the domains' prompts are the same in both: asked once


def test_the_plan_fingerprint_changes_with_everything_the_prompts_depend_on():
    from dataclasses import replace

    from uniil.attrpool.plan import derivation_settings, plan_fingerprint
    from uniil.data.registry import NameSet
    from uniil.prompts.templates import load_templates

    names = NameSet("ds", ("circle", "square"), ("sketch",), "a shape")
    templates = load_templates(["class-appearance", "domain-style"])
    settings = derivation_settings(0.9, "uniil-tiny@seed0")

    def fp(names=names, templates=templates, n=8, form="chat", model="m", settings=settings):
        return plan_fingerprint(names, templates, n, form, model, settings)

    edited = [replace(templates[0], user=templates[0].user + " Be brief."), templates[1]]  # same name@version
    variants = [fp(names=replace(names, classes=("circle", "square", "star"))),
                fp(names=replace(names, classes=("square", "circle"))), fp(names=replace(names, domains=())),
                fp(names=replace(names, context="a toy")), fp(names=replace(names, dataset="other")),
                fp(templates=templates[:1]), fp(templates=edited), fp(n=5), fp(form="completion"), fp(model="m2"),
                fp(settings=derivation_settings(0.8, "uniil-tiny@seed0")),
                fp(settings=derivation_settings(0.9, "ViT-B-16@openai"))]
    assert fp() == fp(names=replace(names, class_ids=("n1", "n2")))  # ids are not asked about
    assert len({fp(), *variants}) == 1 + len(variants)
