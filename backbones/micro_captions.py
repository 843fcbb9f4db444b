"""uniil-micro's pre-training captions, from the renderer's ground truth.

Two kinds of caption. *Naming* captions say what the renderer drew: shape, colour, texture, size,
domain ("a red striped star."). *Attribute* captions (v3) say what people and LLMs say of such a
shape or style, and what is true of it by the renderer's geometry: sides, corners, curved or
straight outline, points, holes, symmetry, elongation; strokes, brush texture, flat fills,
inverted tones ("a shape with 6 sides.", "brush strokes"). An attribute caption is true of every
class that has the fact, so the soft contrastive targets spread over all of them.

Held out: none of the reference annotator's phrases (data/attributes/synthetic.json, what the
benchmark's reference pool holds) occurs in any caption, not even as a part of one: the facts are
said here in other words, and the reference phrases match only through the frozen text tower
(tests/test_micro.py checks both).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..data.synthetic import COLOURS, DOMAINS, SIZES, TEXTURES, class_names

HELD_IN = ("photo", "clipart")
DOMAIN_WORDS = {"photo": "photo", "clipart": "clipart", "sketch": "sketch", "painting": "painting",
                "inverted": "inverted photo"}
FIELDS = ("shape", "colour", "texture", "size", "domain")
WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
         10: "ten", 12: "twelve"}

# Naming templates: (template, fields it names); {domain} reads as a noun ("sketch", "inverted photo").
NAMING = (
    ("a {domain} of a {shape}.", ("shape", "domain")),
    ("a {shape}.", ("shape",)),
    ("a {colour} {shape}.", ("colour", "shape")),
    ("a {texture} {shape}.", ("texture", "shape")),
    ("a {size} {shape}.", ("size", "shape")),
    ("a {size} {colour} {shape}.", ("size", "colour", "shape")),
    ("a {domain} of a {colour} {shape}.", ("domain", "colour", "shape")),
    ("{colour} colour", ("colour",)),
    ("{texture} texture", ("texture",)),
    ("{size} size", ("size",)),
    ("{domain} style", ("domain",)),
    ("a {domain}.", ("domain",)),
)
# Attribute templates: {fact} is one wording of a shape fact; the shape is known only through it.
SHAPE_FACT_TEMPLATES = (
    ("{fact}", ()),
    ("a shape with {fact}.", ()),
    ("a {colour} shape with {fact}.", ("colour",)),
    ("a {shape} with {fact}.", ("shape",)),
)


def _counted(n: int, noun: str) -> list[str]:
    return [f"{n} {noun}", f"{WORDS[n]} {noun}"]


# What a shape looks like, said as people say it of one class only.
LIKENESS = {
    "circle": ["a disc", "round like a coin"],
    "ellipse": ["an egg-like oval"],
    "semicircle": ["a half disc", "a dome outline"],
    "crescent": ["a moon sliver", "a banana-like curve"],
    "ring": ["a donut", "a bagel outline", "a hoop"],
    "square": ["a box outline", "a tile outline"],
    "rectangle": ["a brick outline", "a door-like block"],
    "diamond": ["a rhombus", "a lozenge"],
    "trapezoid": ["a flat-topped wedge", "a lampshade outline"],
    "parallelogram": ["a leaning box", "a skewed rectangle"],
    "triangle": ["a pyramid outline", "a yield-sign outline"],
    "right triangle": ["a set square", "half of a square cut on its diagonal"],
    "pentagon": ["a home plate outline"],
    "hexagon": ["a honeycomb outline", "a nut outline"],
    "octagon": ["a stop-sign outline"],
    "four-pointed star": ["a twinkle", "a sparkle outline"],
    "star": ["a sheriff star", "a starfish outline"],
    "cross": ["a plus symbol", "a first-aid symbol"],
    "arrow": ["a pointer", "a direction sign"],
    "chevron": ["a V shape", "a rank stripe"],
    "heart": ["a valentine symbol", "two bumps on top and a point below"],
    "kite": ["a flying-kite outline"],
    "lightning bolt": ["a zigzag", "a flash symbol"],
    "house": ["a roof over walls", "a pentagon with a peaked top"],
}


def _shape_facts() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """fact key -> (wordings, classes it is true of). Counted straight edges, corners, tips and
    inward corners follow the polygons of data/synthetic.py SHAPES."""
    facts: dict[str, tuple[list[str], tuple[str, ...]]] = {}

    def add(key, wordings, classes):
        facts[key] = (list(wordings), tuple(classes))

    edges = {3: ("triangle", "right triangle"),
             4: ("square", "rectangle", "diamond", "trapezoid", "parallelogram", "kite"),
             5: ("pentagon", "house"), 6: ("hexagon", "chevron"), 7: ("arrow", "lightning bolt"),
             8: ("octagon", "four-pointed star"), 10: ("star",), 12: ("cross",)}
    for n, classes in edges.items():
        add(f"edges-{n}", _counted(n, "edges") + [f"{n} sides", f"{n} straight sides", f"{n} straight edges",
                                                  f"a {WORDS[n]}-sided outline"], classes)
    corners = {0: ("circle", "ellipse", "ring"), 2: ("semicircle",), 3: ("triangle", "right triangle"),
               4: ("square", "rectangle", "diamond", "trapezoid", "parallelogram", "kite"),
               5: ("pentagon", "house"), 6: ("hexagon", "chevron"), 8: ("octagon", "four-pointed star")}
    for n, classes in corners.items():
        add(f"corners-{n}", ["zero corners", "a cornerless outline", "not a single corner"] if n == 0 else
            [f"{n} corners", f"{WORDS[n]} vertices", f"{n} angles", f"{n} pointed corners"], classes)
    add("curved-only", ["only curved edges", "a fully rounded outline", "curves and no lines"],
        ("circle", "ellipse", "ring", "crescent"))
    add("straight-only", ["only straight edges", "an outline made of line segments", "a polygon"],
        tuple(c for cs in edges.values() for c in cs))
    add("straight-and-curved", ["both straight and curved edges", "a flat edge and a rounded edge"], ("semicircle",))
    add("curved-with-point", ["curved sides that come to a point"], ("heart", "crescent"))
    add("hole", ["a hole in its centre", "a hollow middle", "an empty centre"], ("ring",))
    tips = {1: ("heart", "arrow", "house"), 2: ("crescent",), 4: ("four-pointed star",), 5: ("star",)}
    for n, classes in tips.items():
        add(f"tips-{n}", _counted(n, "points") + [f"{n} tips" if n > 1 else "a single tip"], classes)
    add("spiky", ["a spiky star outline", "sharp spikes"], ("star", "four-pointed star"))
    inward = {1: ("chevron", "heart"), 2: ("arrow", "lightning bolt"), 4: ("cross", "four-pointed star"), 5: ("star",)}
    for n, classes in inward.items():
        add(f"inward-{n}", [f"{n} inward corners" if n > 1 else "a single inward corner", f"{WORDS[n]} notches"],
            classes)
    add("concave", ["a concave outline", "corners that point inwards"],
        ("star", "four-pointed star", "cross", "arrow", "chevron", "heart", "lightning bolt", "crescent"))
    add("convex", ["a convex outline", "no dents in its outline"],
        ("circle", "ellipse", "semicircle", "square", "rectangle", "diamond", "trapezoid", "parallelogram",
         "triangle", "right triangle", "pentagon", "hexagon", "octagon", "kite", "house"))
    add("right-angles", ["square corners", "90-degree corners", "right angles"],
        ("square", "rectangle", "right triangle", "cross", "arrow", "house"))
    add("no-right-angles", ["no 90-degree corners"],
        ("diamond", "trapezoid", "parallelogram", "triangle", "pentagon", "hexagon", "octagon", "kite", "chevron",
         "star", "four-pointed star", "lightning bolt"))
    parallel = {1: ("trapezoid",), 2: ("square", "rectangle", "diamond", "parallelogram"), 3: ("hexagon",),
                4: ("octagon",)}
    for n, classes in parallel.items():
        add(f"parallel-{n}", [f"{n} pairs of parallel edges" if n > 1 else "one pair of parallel edges",
                              f"{WORDS[n]} parallel pairs of edges"], classes)
    symmetry = {0: ("parallelogram", "lightning bolt"),
                1: ("semicircle", "crescent", "right triangle", "trapezoid", "kite", "arrow", "chevron", "heart",
                    "house"),
                2: ("ellipse", "rectangle", "diamond"), 3: ("triangle",), 4: ("square", "cross", "four-pointed star"),
                5: ("pentagon", "star"), 6: ("hexagon",), 8: ("octagon",)}
    for n, classes in symmetry.items():
        add(f"symmetry-{n}", ["no mirror symmetry", "an asymmetric outline"] if n == 0 else
            [f"{n} axes of symmetry" if n > 1 else "a single axis of symmetry",
             f"{WORDS[n]} mirror axes" if n > 1 else "mirror symmetric about one axis"], classes)
    add("symmetry-round", ["symmetric in every direction", "rotationally symmetric"], ("circle", "ring"))
    add("equal-sides", ["equal sides", "all edges the same length", "a regular polygon"],
        ("square", "triangle", "pentagon", "hexagon", "octagon"))
    add("compact", ["as tall as it is wide", "a compact, even outline"],
        ("circle", "ring", "square", "pentagon", "hexagon", "octagon", "star", "four-pointed star", "cross",
         "triangle", "heart"))
    add("elongated", ["an elongated outline", "stretched in one direction", "longer than it is wide"],
        ("ellipse", "rectangle", "semicircle", "arrow", "lightning bolt", "diamond", "kite"))
    add("slim", ["a slim, stretched outline", "thin and long"], ("lightning bolt", "arrow"))
    add("slanted", ["slanted sides", "leaning edges"], ("parallelogram", "trapezoid", "lightning bolt"))
    add("sharp-corners", ["acute, sharp corners", "pointy corners"],
        ("triangle", "star", "four-pointed star", "diamond", "kite", "chevron", "arrow", "lightning bolt",
         "parallelogram", "trapezoid", "crescent"))
    add("blunt-corners", ["obtuse, blunt corners", "wide open corners"],
        ("pentagon", "hexagon", "octagon", "diamond", "kite", "trapezoid", "parallelogram", "house"))
    for shape, wordings in LIKENESS.items():
        add(f"like-{shape}", wordings, (shape,))
    return facts


# What every image of a domain shows (data/synthetic.py _background, _paint_shape, render).
STYLE_FACTS = {
    "photo": ["photographic shading", "a gradient backdrop", "noisy camera pixels", "a realistic look"],
    "clipart": ["flat colour fills", "a bold dark outline", "a blank white backdrop", "clean vector art"],
    "sketch": ["pencil strokes", "grey hand-drawn lines", "an unfilled line drawing", "a drawing on paper"],
    "painting": ["brush strokes", "brush texture", "smeared paint", "a blurry painted look"],
    "inverted": ["inverted tones", "negative colours", "reversed colours like film", "complementary colours"],
}
STYLE_TEMPLATES = ("{fact}", "an image with {fact}.")


@dataclass
class CaptionWorld:
    """Every caption that can be drawn: texts, shape_mask [M, S] (True where the caption is true of the
    shape), codes [M, 5] (-1 = not named; the shape column is used by naming captions only)."""

    texts: list[str]
    shape_mask: np.ndarray
    codes: np.ndarray
    index: dict[str, int]
    facts_of_shape: list[list[tuple[str, ...]]]  # per shape: the wordings of each of its facts
    fact_bank: np.ndarray  # [F] every shape fact's wordings on their own ("6 sides"): the attribute loss's

    def colour_bank(self) -> np.ndarray:
        """[12] the captions "{colour} colour" in colour order."""
        template = next(t for t, fields in NAMING if fields == ("colour",))
        return np.asarray([self.index[template.format(colour=c)] for c in field_values()["colour"]])

    def name_banks(self) -> np.ndarray:
        """[5, S] per domain, the captions "a {domain} of a {shape}." in class order: the zero-shot
        classifier's own wording."""
        template = next(t for t, fields in NAMING if fields == ("shape", "domain"))
        return np.asarray([[self.index[template.format(domain=DOMAIN_WORDS[d], shape=s)]
                            for s in field_values()["shape"]] for d in DOMAINS])

    def truth(self, captions: np.ndarray, image_codes: np.ndarray) -> np.ndarray:
        """[B_img, B_cap] True where caption j is true of image i."""
        c = self.codes[captions][None, :, 1:]
        t = image_codes[:, None, 1:]
        fields = ((c == -1) | (c == t)).all(-1)
        return fields & self.shape_mask[captions][:, image_codes[:, 0]].T


def field_values() -> dict[str, tuple[str, ...]]:
    return {"shape": tuple(class_names()), "colour": tuple(COLOURS), "texture": TEXTURES, "size": tuple(SIZES),
            "domain": DOMAINS}


@lru_cache(maxsize=1)
def caption_world() -> CaptionWorld:
    values = field_values()
    shapes = values["shape"]
    texts, masks, codes = [], [], []

    def emit(text, shape_set, code):
        texts.append(text)
        masks.append(np.isin(np.arange(len(shapes)), [shapes.index(s) for s in shape_set]))
        codes.append(code)

    for template, fields in NAMING:
        for combo in itertools.product(*[range(len(values[f])) for f in fields]):
            words = {f: values[f][i] for f, i in zip(fields, combo)}
            if "domain" in words:
                words["domain"] = DOMAIN_WORDS[words["domain"]]
            code = [-1] * len(FIELDS)
            for f, i in zip(fields, combo):
                code[FIELDS.index(f)] = i
            emit(template.format(**words), [values["shape"][code[0]]] if code[0] >= 0 else shapes, code)
    facts = _shape_facts()
    for wordings, classes in facts.values():
        for wording in wordings:
            for template, fields in SHAPE_FACT_TEMPLATES:
                if fields == ("colour",):
                    for i, colour in enumerate(values["colour"]):
                        emit(template.format(fact=wording, colour=colour), classes, [-1, i, -1, -1, -1])
                elif fields == ("shape",):
                    for s in classes:
                        emit(template.format(fact=wording, shape=s), [s], [shapes.index(s), -1, -1, -1, -1])
                else:
                    emit(template.format(fact=wording), classes, [-1] * 5)
    for d, wordings in STYLE_FACTS.items():
        for wording in wordings:
            for template in STYLE_TEMPLATES:
                emit(template.format(fact=wording), shapes, [-1, -1, -1, -1, DOMAINS.index(d)])
    index = {t: i for i, t in enumerate(texts)}
    if len(index) != len(texts):
        dup = next(t for t in texts if texts.count(t) > 1)
        raise AssertionError(f"caption said twice: {dup!r}")  # two facts with one wording would mislabel it
    of_shape = [[tuple(w) for w, cs in facts.values() if s in cs] for s in shapes]
    bank = np.asarray([index[w] for wordings, _ in facts.values() for w in wordings])
    return CaptionWorld(texts, np.stack(masks), np.asarray(codes, np.int64), index, of_shape, bank)


# How often each kind of caption is drawn for a held-in image. Naming the shape is what zero-shot
# needs most; colour alone is learnt far faster than shape.
KIND_WEIGHTS = {"shape-naming": 3.0, "other-naming": 1.0, "shape-fact": 3.0, "style-fact": 1.0}


def sample_caption(world: CaptionWorld, code: np.ndarray, rng: np.random.Generator) -> int:
    """One true caption of an image with truth `code` (indices into field_values(), shape first)."""
    values = field_values()
    domain = DOMAINS[code[4]]
    held_in = domain in HELD_IN
    kinds = ["style-fact", "other-naming"] + (["shape-naming", "shape-fact"] if held_in else [])
    if held_in:
        p = np.asarray([KIND_WEIGHTS[k] for k in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    else:  # held-out domains are captioned with their style only, as web data knows styles
        kind = kinds[int(rng.integers(2))]
    if kind == "style-fact":
        template = STYLE_TEMPLATES[int(rng.integers(len(STYLE_TEMPLATES)))]
        return world.index[template.format(fact=STYLE_FACTS[domain][int(rng.integers(len(STYLE_FACTS[domain])))])]
    words = {f: values[f][code[i]] for i, f in enumerate(FIELDS)}
    words["domain"] = DOMAIN_WORDS[domain]
    if not held_in:  # "{domain} style" or "a {domain}.": the naming templates that name the domain only
        style_naming = [t for t, fields in NAMING if fields == ("domain",)]
        return world.index[style_naming[int(rng.integers(len(style_naming)))].format(**words)]
    if kind == "shape-fact":
        facts = world.facts_of_shape[code[0]]
        wordings = facts[int(rng.integers(len(facts)))]
        template = SHAPE_FACT_TEMPLATES[int(rng.integers(len(SHAPE_FACT_TEMPLATES)))][0]
        return world.index[template.format(fact=wordings[int(rng.integers(len(wordings)))], **words)]
    naming = [t for t, fields in NAMING if ("shape" in fields) == (kind == "shape-naming")]
    return world.index[naming[int(rng.integers(len(naming)))].format(**words)]
