"""`uniil attrs import`: descriptor files go down the pool's own derivation (normalise, MiniLM dedupe,
CLIP text tower, FAISS) with provenance naming the file; names are matched by name, never by
position, and unknown ones refused before anything is written. The shipped reference files
(data/attributes/) are checked against the renderers' own geometry, so they cannot drift from it.

Real DuckDB, real FAISS, real MiniLM and the built-in random `uniil-tiny` text tower: offline."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import run_cli, run_uniil_process, server_args
from test_bad_input import assert_one_line_error
from uniil.attrpool.normalize import normalize_phrase
from uniil.attrpool.store import PoolStore
from uniil.data.registry import DATA_DIR, load_dataset_names

REFERENCE = DATA_DIR / "attributes"
TINY = ("--clip-model", "uniil-tiny")
# Reference files are imported with exact dedupe: MiniLM puts "four lines of mirror symmetry" and
# "one line of mirror symmetry" at cosine 0.92, above the default 0.9 (see README).
EXACT = ("--dedupe-threshold", "1")


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def listed(cli, pool, kind: str = "class") -> dict[str, list[str]]:
    """`uniil attrs list`'s attributes of each class (or domain), sorted: a source's attributes come
    in the derivation's priority order, not the file's."""
    res = cli("attrs", "list", "--pool", pool, "--json")
    assert res.code == 0, res.err
    found = json.loads(res.out)
    with PoolStore.open_for_read(pool) as store:
        names = set(store.source_names(kind))
    return {k: sorted(v) for k, v in found.items() if k in names}


def imported(cli, *args) -> None:
    res = cli("attrs", "import", *args)
    assert res.code == 0, res.err


def one_line_error(res, *needles: str) -> None:
    """assert_one_line_error for an in-process run (run_cli's result)."""
    assert_one_line_error(SimpleNamespace(returncode=res.code, stderr=res.err), *needles)


# -- formats ---------------------------------------------------------------------------------------

def test_classify_by_description_json_with_provenance_naming_the_file(cli, tmp_path):
    descriptors = write(tmp_path / "cbd.json", json.dumps({
        "Circle": ["a round outline", "no corners"],  # case and spacing differ from data/names
        "four-pointed  star": ["four pointed tips", "has a sparkle shape"],
        "ring": [],  # named, nothing to say: no attributes, no error
    }))
    pool = tmp_path / "p.duckdb"
    imported(cli, descriptors, "--pool", pool, "--dataset", "synthetic", *TINY)
    found = listed(cli, pool)
    assert found == {"circle": ["no corners", "round outline"],
                     "four-pointed star": ["four pointed tips", "sparkle shape"]}

    sha = hashlib.sha256(descriptors.read_bytes()).hexdigest()
    with PoolStore.open_for_read(pool) as store:
        calls = store.con.execute("SELECT DISTINCT backend, base_url, model, template, prompt_hash FROM llm_calls").fetchall()
        prov = store.con.execute("SELECT DISTINCT template FROM provenance").fetchall()
        stats = store.stats()
    assert calls == [("import", str(descriptors.resolve()), f"file:cbd.json@{sha[:12]}", "import:cbd.json",
                      f"sha256:{sha}")]
    assert prov == [("import:cbd.json",)]
    assert stats["classes"] == 24 and stats["domains"] == 5 and stats["backbone"] == "uniil-tiny@seed0"
    assert stats["models"] == [f"file:cbd.json@{sha[:12]}"]

    # The trainer's loader sees them like any other attributes.
    from uniil.attrpool.match import PoolAttributes
    attrs = PoolAttributes.load(pool)
    assert attrs.sources[attrs.texts.index("sparkle shape")] == ["four-pointed star"]

    # The same file again adds nothing and derives nothing.
    before = stats
    res = cli("attrs", "import", descriptors, "--pool", pool)
    assert res.code == 0 and "imported before" in res.out and "up to date" in res.out, res.out
    with PoolStore.open_for_read(pool) as store:
        assert store.stats() == before


def test_cupl_sentences_are_kept_whole(cli, tmp_path):
    sentence = "A photo of a hexagon, which has six equal straight sides and six blunt corners."
    cupl = write(tmp_path / "cupl.json", json.dumps({"hexagon": [sentence]}))
    pool = tmp_path / "p.duckdb"
    imported(cli, cupl, "--pool", pool, "--dataset", "synthetic", *TINY)
    assert listed(cli, pool) == {"hexagon": [normalize_phrase(sentence)]}  # 14 words: an LLM's would be cut


def test_csv_with_a_kind_column_and_two_column_csv(cli, tmp_path):
    rows = write(tmp_path / "rows.csv", "kind,source,attribute\nclass,zero,one closed loop\n"
                                        "class,Seven,a flat bar\ndomain,scan,dark background\nclass,zero,\n")
    pool = tmp_path / "p.duckdb"
    imported(cli, rows, "--pool", pool, "--dataset", "synthetic-digits", *TINY)
    assert listed(cli, pool) == {"zero": ["one closed loop"], "seven": ["flat bar"]}
    assert listed(cli, pool, "domain") == {"scan": ["dark background"]}
    # Into the same pool: names now come from the pool itself (no --dataset needed).
    pairs = write(tmp_path / "pairs.csv", "class,attribute\nnine,a tail below the loop\n")
    imported(cli, pairs, "--pool", pool)
    assert listed(cli, pool)["nine"] == ["tail below the loop"]


def test_flat_json_of_domains_with_kind_domain(cli, tmp_path):
    styles = write(tmp_path / "styles.json", json.dumps({"Sketch": ["grey pencil lines"], "clipart": ["flat fills"]}))
    pool = tmp_path / "p.duckdb"
    one_line_error(cli("attrs", "import", styles, "--pool", pool, "--dataset", "synthetic", *TINY),
                   "2 class(es) 'Sketch', 'clipart'")  # keys are classes unless --kind says otherwise
    one_line_error(cli("attrs", "import", styles, "--pool", pool, "--kind", "style"), "unknown --kind 'style'")
    imported(cli, styles, "--pool", pool, "--dataset", "synthetic", "--kind", "domain", *TINY)
    assert listed(cli, pool, "domain") == {"sketch": ["grey pencil lines"], "clipart": ["flat fills"]}
    assert listed(cli, pool) == {}


def test_keys_in_another_order_map_to_their_own_classes(cli, tmp_path):
    names = load_dataset_names("synthetic-digits").classes
    shuffled = dict(reversed([(n, [f"marker {n} {i}"]) for i, n in enumerate(names)]))
    pool = tmp_path / "p.duckdb"
    imported(cli, write(tmp_path / "r.json", json.dumps(shuffled)), "--pool", pool,
             "--dataset", "synthetic-digits", *TINY, *EXACT)
    found = listed(cli, pool)
    assert list(found) == list(names)  # the dataset's label order, whatever the file's
    assert all(found[n] == [f"marker {n} {i}"] for i, n in enumerate(names))


def test_export_then_import_round_trips(cli, tmp_path):
    first = tmp_path / "a.duckdb"
    imported(cli, REFERENCE / "synthetic-patterns.json", "--pool", first, *TINY, *EXACT)
    for fmt, kind in (("csv", "all"), ("json", "class")):
        exported = tmp_path / f"export.{fmt}"
        assert cli("attrs", "export", "--pool", first, "--format", fmt, "--kind", kind, "-o", exported).code == 0
        again = tmp_path / f"b-{fmt}.duckdb"
        imported(cli, exported, "--pool", again, "--dataset", "synthetic-patterns", *TINY, *EXACT)
        for k in ("class", "domain") if kind == "all" else ("class",):
            assert listed(cli, again, k) == listed(cli, first, k), (fmt, k)


def test_import_beside_llm_answers(cli, llm_server, tmp_path):
    pool, classes = tmp_path / "p.duckdb", write(tmp_path / "shapes.txt", "circle\nsquare\n")
    build = ("attrs", "build", "--pool", pool, "--classes", classes, "--domains", "",
             "--templates", "class-appearance", *server_args(llm_server))
    assert cli(*build).code == 0
    llm = listed(cli, pool)
    imported(cli, write(tmp_path / "d.json", json.dumps({"square": ["four right-angled corners"]})),
             "--pool", pool)
    both = listed(cli, pool)
    assert both["circle"] == llm["circle"] and both["square"] == sorted(llm["square"] + ["four right angled corners"])
    requests = len(llm_server.log)
    assert cli(*build).code == 0 and len(llm_server.log) == requests  # a build rerun still asks nothing
    assert listed(cli, pool) == both


# -- refusals ----------------------------------------------------------------------------------------

def test_unknown_names_are_refused_in_one_line_and_nothing_is_written(tmp_path):
    bad = write(tmp_path / "bad.json", json.dumps({"circel": ["round"], "square": ["four sides"], "tri angle": ["x"],
                                                   **{f"shape {i}": ["y"] for i in range(6)}}))
    pool = tmp_path / "p.duckdb"
    proc = run_uniil_process("attrs", "import", bad, "--pool", pool, "--dataset", "synthetic", *TINY)
    assert_one_line_error(proc, "bad.json names 8 class(es) 'circel', 'tri angle',", "and 3 more",
                          "did you mean 'circle'?", "dataset synthetic", "data/names/synthetic.txt",
                          "nothing was imported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_refused_import_leaves_an_existing_pool_as_it_was(cli, tmp_path):
    pool = tmp_path / "p.duckdb"
    imported(cli, write(tmp_path / "ok.json", json.dumps({"zero": ["a closed loop"]})),
             "--pool", pool, "--dataset", "synthetic-digits", *TINY)
    before = pool.read_bytes()
    one_line_error(cli("attrs", "import", write(tmp_path / "d.json", json.dumps({"scan": ["grain"]})), "--pool", pool),
                   "1 class(es) 'scan'", f"pool {pool.name}", "uniil attrs list --pool")
    one_line_error(cli("attrs", "import", tmp_path / "ok.json", "--pool", pool, "--clip-model", "ViT-B-32",
                       "--clip-pretrained", "none"), "built with backbone uniil-tiny@seed0, not ViT-B-32@none")
    one_line_error(cli("attrs", "import", REFERENCE / "synthetic.json", "--pool", pool, "--dataset", "synthetic-digits"),
                   "written for dataset synthetic, not synthetic-digits")
    assert pool.read_bytes() == before


@pytest.mark.parametrize("name, text, needles", [
    ("a.json", '{"circle": ["round",', ["a.json is not valid JSON", "line 1"]),
    ("a.json", '[["round"]]', ["is a JSON list", "keyed by class name"]),
    ("a.json", '{"circle": "round"}', ["value of 'circle' is a string, not a list of strings"]),
    ("a.json", '{"circle": ["round", 3]}', ["value of 'circle' is a list holding a number"]),
    ("a.json", '{"classes": {"circle": ["round"]}, "extra": 1}', ["unknown top-level key(s) 'extra'"]),
    ("a.json", "  \n", ["a.json is empty"]),
    ("a.json", "{}", ["empty JSON object"]),
    ("a.csv", "", ["a.csv is empty"]),
    ("a.csv", ",,,\n , \n", ["a.csv has no rows", "kind,source,attribute"]),
    ("a.csv", "name,value\ncircle,round\n", ["header row is 'name,value'", "kind,source,attribute"]),
    ("a.csv", "kind,source,attribute\nshape,circle,round\n", ["a.csv, row 2: kind 'shape'"]),
    ("a.txt", "circle: round\n", ["unknown descriptor file type '.txt'", ".json", ".csv"]),
    ("a.json", '{"circle": ["circle", "Circle!"]}', ["no usable attribute in a.json"]),
])
def test_malformed_files_are_refused_in_one_line(cli, tmp_path, name, text, needles):
    res = cli("attrs", "import", write(tmp_path / name, text), "--pool", tmp_path / "p.duckdb",
              "--dataset", "synthetic", *TINY)
    one_line_error(res, *needles)
    assert not (tmp_path / "p.duckdb").exists() and not (tmp_path / "p.duckdb.partial").exists()


def test_a_failed_derivation_leaves_no_new_pool(cli, tmp_path):
    """The file is fine, but the backbone cannot load (offline): no pool, and no work file, remain."""
    res = cli("attrs", "import", write(tmp_path / "a.json", '{"circle": ["round"]}'), "--pool", tmp_path / "p.duckdb",
              "--dataset", "synthetic", "--clip-model", "ViT-B-32")
    one_line_error(res, "cannot load weights 'openai' for ViT-B-32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_an_import_into_an_unfinished_build_is_refused_and_keeps_its_answers(cli, tmp_path):
    """An interrupted `attrs build` left `p.duckdb.partial` with a paid answer: an import into the same
    pool is refused, and the work file stays for the build's rerun."""
    from uniil.attrpool.store import CallRecord, partial_path

    pool = tmp_path / "p.duckdb"
    store = PoolStore.open_for_write(pool)
    store.add_requests([("k", "class", "circle", "t@v1", "chat", "m", 8, "{}")])
    store.record_calls([CallRecord("k", "server", None, "m", "t@v1", "chat", "h", None, 0, "ok", response="round")])
    store.close()
    res = cli("attrs", "import", write(tmp_path / "a.json", '{"circle": ["round"]}'), "--pool", pool,
              "--dataset", "synthetic", *TINY)
    one_line_error(res, "is not finished", "rerun the same `uniil attrs build` command")
    with PoolStore.open_for_read(pool, allow_partial=True) as store:
        assert store.path == partial_path(pool) and store.count_requests("answered") == 1


def test_a_new_pool_needs_to_know_its_dataset(cli, tmp_path):
    res = cli("attrs", "import", write(tmp_path / "a.json", '{"circle": ["round"]}'), "--pool", tmp_path / "p.duckdb")
    one_line_error(res, "pool", "is new", "--dataset NAME")


# -- the reference files -------------------------------------------------------------------------------

BENCHMARK_DATASETS = ("synthetic", "synthetic-digits", "synthetic-patterns")  # synthetic-uniil's datasets


@pytest.fixture(scope="module")
def reference_pool(tmp_path_factory):
    """One pool holding all three reference files, as the benchmark uses them."""
    pool = tmp_path_factory.mktemp("reference") / "ref.duckdb"
    for dataset in BENCHMARK_DATASETS:  # the first import makes the pool; the others join it
        res = run_cli("attrs", "import", REFERENCE / f"{dataset}.json", "--pool", pool,
                      *(TINY + EXACT if dataset == BENCHMARK_DATASETS[0] else ()))
        assert res.code == 0, res.err
    return pool


@pytest.mark.parametrize("dataset", BENCHMARK_DATASETS)
def test_reference_file_gives_every_class_and_domain_its_own_attributes(cli, reference_pool, dataset):
    names = load_dataset_names(dataset)
    ref = json.loads((REFERENCE / f"{dataset}.json").read_text(encoding="utf-8"))
    for kind, section, expected in (("class", "classes", names.classes), ("domain", "domains", names.domains)):
        found = {k: v for k, v in listed(cli, reference_pool, kind).items() if k in expected}
        assert list(found) == list(expected)  # every one, in label order
        for name, attributes in found.items():
            assert len(attributes) >= 4
            assert attributes == sorted(normalize_phrase(p) for p in ref[section][name]), name


NUMBERS = {w: i for i, w in enumerate("no one two three four five six seven eight nine ten eleven twelve".split())}
NUM = r"\b(" + "|".join(NUMBERS) + r")"


def _interior_angles(poly) -> list[float]:
    p = np.asarray(poly, float)
    ccw = np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]) > 0
    out = []
    for i in range(len(p)):
        u, v = p[i] - p[i - 1], p[(i + 1) % len(p)] - p[i]
        turn = math.degrees(math.atan2(u[0] * v[1] - u[1] * v[0], u @ v))
        out.append(180 - (turn if ccw else -turn))
    return out


def _shape_facts(shape: str) -> dict:
    """What the renderer's own table says about a shape: corners, edges, symmetry, proportions."""
    from uniil.data.synthetic import SHAPES, _mask

    parts = SHAPES[shape]
    outline = parts[0][0]
    corners = [a for a in _interior_angles(outline) if abs(a - 180) > 20]  # sampled curves turn ~6 degrees a vertex
    p = np.asarray(outline, float)
    extents = []
    for deg in range(180):
        d = np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])
        extents.append(np.ptp(p @ d) / np.ptp(p @ np.array([-d[1], d[0]])))
    # Mirror lines from the rendered mask itself: reflect every pixel about lines through the centroid.
    n = 240
    mask = np.asarray(_mask(shape, n * 0.8, 0.0, (n / 2, n / 2), n)) > 127
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs - xs.mean(), ys - ys.mean()], 1)

    def kept(image_of) -> bool:
        q = np.clip(np.round(image_of + [xs.mean(), ys.mean()]).astype(int), 0, n - 1)
        return mask[q[:, 1], q[:, 0]].mean() > 0.98  # true axes score >= 0.983 at this size, others <= 0.92

    axes = [deg for deg in np.arange(0, 180, 0.5)
            if kept(2 * (pts @ (d := np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])))[:, None] * d - pts)]
    lines = sum(1 for i, a in enumerate(axes) if i == 0 or a - axes[i - 1] > 1)
    if len(axes) > 1 and axes[0] == 0 and axes[-1] == 179.5:
        lines -= 1  # a line near 0 degrees wraps around to 180
    curved = all(len(poly) >= 32 for poly, _ in parts)  # sampled curves only: no straight edge
    return {"edges": 0 if curved else len(outline) if len(outline) < 20 else None, "corners": len(corners),
            "right": sum(abs(a - 90) < 2 for a in corners), "sharp": sum(a < 88 for a in corners),
            "blunt": sum(92 < a < 160 for a in corners), "inward": sum(a > 200 for a in corners),
            "mirror": "any" if len(axes) > 300 else lines, "half turn": kept(-pts),
            "long edges": sum(np.hypot(*(p[i] - p[i - 1])) > 0.3 for i in range(len(p))), "elongation": max(extents)}


# (pattern, fact, how the phrase's number compares with the fact); phrases of shapes are checked
# against every pattern they match.
SHAPE_CLAIMS = [
    (NUM + r" (?:equal )?straight (?:sides|edges)\b", "edges", None),
    (NUM + r" corners?\b", "corners", None),
    (NUM + r" right-angled corners?", "right", None),
    (NUM + r" (?:sharp corners?|pointed tips?)", "sharp", None),
    (NUM + r" blunt corners?", "blunt", None),
    (NUM + r" inward corners?", "inward", None),
    (NUM + r" lines? of mirror symmetry", "mirror", None),
    (r"\bone straight edge\b", "long edges", 1),
    (r"symmetric about any line", "mirror", "any"),
    (r"the same after a half turn", "half turn", True),
]


def test_shape_reference_agrees_with_the_shape_table():
    ref = json.loads((REFERENCE / "synthetic.json").read_text(encoding="utf-8"))["classes"]
    checked = 0
    for shape, phrases in ref.items():
        facts = _shape_facts(shape)
        for phrase in phrases:
            for pattern, fact, want in SHAPE_CLAIMS:
                for m in re.finditer(pattern, phrase):
                    expected = want if want is not None else NUMBERS[m.group(1)]
                    assert facts[fact] == expected, (shape, phrase, fact, facts[fact])
                    checked += 1
            if "twice as long as it is wide" in phrase:
                low, high = (1.7, 1.95) if phrase.startswith("nearly") else (1.95, 2.05)
                assert low <= facts["elongation"] <= high, (shape, phrase, facts["elongation"])
                checked += 1
            elif "as long as it is wide" in phrase:
                assert facts["elongation"] < 1.05, (shape, phrase)
                checked += 1
    assert checked >= 60  # most phrases state a checkable count


def _holes(strokes, pen: float) -> int:
    """Closed areas of a glyph written with a pen `pen` glyph units wide."""
    n, scale = 240, 90
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        draw.line([(n / 2 + x * scale, n / 2 + y * scale) for x, y in stroke], fill=255, width=int(pen * scale),
                  joint="curve")
    ImageDraw.floodfill(img, (0, 0), 128)
    holes = []
    while (free := np.argwhere(np.asarray(img) == 0)).size:
        ImageDraw.floodfill(img, (int(free[0][1]), int(free[0][0])), 128)
        holes.append(len(free) - int((np.asarray(img) == 0).sum()))
    return sum(area > 150 for area in holes)  # specks where a thick line's segments join are no holes


def test_digit_reference_agrees_with_the_glyphs():
    from uniil.data.digits import GLYPHS, HAND

    # The renderer's pens, in glyph units (half the glyph's height): the thinnest on the tallest
    # glyph, the thickest on the shortest.
    pens = np.linspace(HAND.pen[0] / (HAND.height[1] / 2), HAND.pen[1] / (HAND.height[0] / 2), 4)
    ref = json.loads((REFERENCE / "synthetic-digits.json").read_text(encoding="utf-8"))["classes"]
    checked = 0
    for digit, phrases in ref.items():
        variants = GLYPHS[digit]  # a phrase must hold for every way the renderer writes the digit
        for phrase in phrases:
            if m := re.search(r"\b(no|a|a single|one|two) closed (?:oval )?loops?\b|\b(no|one|two) holes?\b", phrase):
                word = m.group(1) or m.group(2)
                want = {"a": 1, "a single": 1}.get(word, NUMBERS.get(word))
                assert all(_holes(v, pen) == want for v in variants for pen in pens), (digit, phrase)
            elif re.search(r"no curved strokes|straight strokes only", phrase):
                assert all(len(s) <= 4 for v in variants for s in v), (digit, phrase)
            elif re.search(r"no straight strokes|curved strokes only", phrase):
                assert all(len(s) >= 10 for v in variants for s in v), (digit, phrase)
            elif re.search(r"one continuous (?:curved )?stroke", phrase):
                assert all(len(v) == 1 for v in variants), (digit, phrase)
            elif "two separate strokes" in phrase:
                assert all(len(v) == 2 for v in variants), (digit, phrase)
            else:
                continue
            checked += 1
    assert checked >= 20


def test_reference_classes_name_no_colour_and_no_direction():
    """Colours are drawn at random per image, and shapes and patterns at any rotation: a phrase that
    names a colour or a direction is false of most images of its class."""
    from uniil.data.synthetic import COLOURS

    colour = re.compile(r"\b(" + "|".join([*COLOURS, "grey"]) + r")\b")
    direction = re.compile(r"\b(left|top|bottom|upwards?|downwards?|horizontal|vertical|upright|above|below|tall)\b"
                           r"|\bright\b(?!-angled| angle)")
    for dataset in ("synthetic", "synthetic-patterns"):
        for name, phrases in json.loads((REFERENCE / f"{dataset}.json").read_text(encoding="utf-8"))["classes"].items():
            for phrase in phrases:
                assert not colour.search(phrase) and not direction.search(phrase), (dataset, name, phrase)


def test_reference_csv_style_rows_read_like_export(tmp_path):
    """A sectioned reference file and the CSV `attrs export` would write for it read the same entries."""
    from uniil.attrpool.descriptors import read_descriptor_file

    sections = read_descriptor_file(REFERENCE / "synthetic-digits.json")
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "source", "attribute"])
        w.writerows([e.kind, e.name, p] for e in sections.entries for p in e.phrases)
    from_csv = read_descriptor_file(rows)
    assert [(e.kind, e.name, e.phrases) for e in from_csv.entries] == \
           [(e.kind, e.name, e.phrases) for e in sections.entries]
    assert sections.dataset == "synthetic-digits" and sections.format == "json-sections"
