"""Long real English text for LLM evaluation, from Debian packages (no model hub, no R).

=============  ======================  ==================================================
name           Debian package          content
=============  ======================  ==================================================
``austen``     ``r-cran-janeaustenr``  Jane Austen's six novels (717k words), public domain
``mobydick``   ``r-cran-tokenizers``   Moby-Dick (215k words), public domain
``jargon``     ``jargon-text``         the Jargon File 4.4.7 (239k words), public domain
``pydocs``     ``python3.11-doc``      the Python 3.11 tutorial, reST sources (PSF licence)
=============  ======================  ==================================================

The packages are *downloaded and unpacked*, never installed, so the R packages do not pull in
the R runtime and no root is needed::

    python -m tokenmerge.eval.corpora install      # apt-get download + dpkg -x

which unpacks them under :func:`debian_root` (``$TOKENMERGE_DEBIAN``, else
``<tokenmerge cache>/debian``). A system-wide copy (``/usr/...``) is used as well. The R data
sets live in R lazy-load databases (``Rdata.rdx`` + ``Rdata.rdb``), read here with the
``rdata`` package. Every file read is checked against a pinned sha256 first.

Text is normalised for a language model: Gutenberg headers and the Jargon File's table of
contents are cut, hard-wrapped paragraphs are re-flowed into single lines, and paragraphs are
separated by blank lines (the Python tutorial keeps its reST layout).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .rlazy import read_lazydata
from .text_data import debian_root
from .zoo import AssetError, ChecksumError, MissingPackageError, verify_sha256

__all__ = [
    "CORPORA",
    "DEBIAN_PACKAGES",
    "INSTALL",
    "debian_root",
    "documents",
    "install",
    "installed",
    "text",
]

DEBIAN_PACKAGES: tuple[str, ...] = (
    "r-cran-janeaustenr",
    "r-cran-tokenizers",
    "jargon-text",
    "python3.11-doc",
)
INSTALL = (
    "python -m tokenmerge.eval.corpora install  (or: apt-get download "
    + " ".join(DEBIAN_PACKAGES)
    + ' && for f in *.deb; do dpkg -x "$f" $TOKENMERGE_DEBIAN; done)'
)

_R_LIB = "usr/lib/R/site-library"
_PYDOCS = "usr/share/doc/python3.11/html/_sources/tutorial"


@dataclass(frozen=True)
class Corpus:
    """One text source: its Debian package, the files read (relative to the unpack root) and
    their pinned sha256 values."""

    name: str
    package: str
    files: dict[str, str]
    description: str


CORPORA: dict[str, Corpus] = {
    "austen": Corpus(
        "austen",
        "r-cran-janeaustenr",
        {
            f"{_R_LIB}/janeaustenr/data/Rdata.rdx": (
                "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f"
            ),
            f"{_R_LIB}/janeaustenr/data/Rdata.rdb": (
                "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"
            ),
        },
        "Jane Austen's six novels",
    ),
    "mobydick": Corpus(
        "mobydick",
        "r-cran-tokenizers",
        {
            f"{_R_LIB}/tokenizers/data/Rdata.rdx": (
                "597c9d0f30a6fd0f70a87130d5b424e6cf690894efd8ac283e75cd44d58847cd"
            ),
            f"{_R_LIB}/tokenizers/data/Rdata.rdb": (
                "2a7581d1d9c2f49fd8c8493e556f984f4a5cdc071eeb6248b0fa719be6b088fe"
            ),
        },
        "Herman Melville, Moby-Dick",
    ),
    "jargon": Corpus(
        "jargon",
        "jargon-text",
        {
            "usr/share/doc/jargon-text/jargon.txt.gz": (
                "fcaa76e4c2ebdf90c6557524b9430373dc49d1a26462ef30f43c0ace70a25a3a"
            )
        },
        "the Jargon File 4.4.7",
    ),
    "pydocs": Corpus(
        "pydocs",
        "python3.11-doc",
        # a manifest over the tutorial's 17 files ("<name> <sha256>\n", sorted by name)
        {_PYDOCS: "9bb064ed17c7fe1a735193833928706e5d2739fa4aa65154041c2bd5e4954cd6"},
        "the Python 3.11 tutorial (reST)",
    ),
}
_AUSTEN_BOOKS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


# --------------------------------------------------------------------------------------------
# Installing and locating the files
# --------------------------------------------------------------------------------------------


def install(packages: Sequence[str] = DEBIAN_PACKAGES, root: Path | None = None) -> Path:
    """Download the Debian packages and unpack them under ``root`` (no root rights, no R).

    Runs ``apt-get download PKG...`` in a temporary folder, then ``dpkg -x`` on each file.
    Returns the unpack root.
    """
    root = Path(root) if root is not None else debian_root()
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if apt is None or dpkg is None:
        raise MissingPackageError(
            "apt-get and dpkg are needed to fetch the text corpora (a Debian or Ubuntu system)"
        )
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [apt, "download", *packages], cwd=tmp, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise MissingPackageError(
                f"apt-get download {' '.join(packages)} failed ({done.stderr.strip()[-300:]}); "
                "run 'apt-get update' first or check the network"
            )
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run([dpkg, "-x", str(deb), str(root)], check=True)
    return root


#: also searched, after :func:`debian_root`: a system-wide install
SYSTEM_ROOTS: tuple[Path, ...] = (Path("/"),)


def _locate(relpath: str, corpus: Corpus) -> Path:
    for base in (debian_root(), *SYSTEM_ROOTS):
        p = base / relpath
        if p.exists():
            return p
    raise MissingPackageError(
        f"the {corpus.name} corpus ({corpus.package}) is not unpacked (looked for {relpath} "
        f"under {debian_root()} and {', '.join(map(str, SYSTEM_ROOTS))}). "
        f"Install it with: {INSTALL}"
    )


def _checked(corpus: Corpus) -> list[Path]:
    out = []
    for rel, sha in corpus.files.items():
        p = _locate(rel, corpus)
        if p.is_dir():
            _check_manifest(p, sha, corpus)
        else:
            verify_sha256(p, sha)
        out.append(p)
    return out


def _check_manifest(folder: Path, expected: str, corpus: Corpus) -> None:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.rst.txt")):
        h.update(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    if h.hexdigest() != expected:
        raise ChecksumError(
            f"sha256 mismatch for the files of {folder} ({corpus.package}): expected manifest "
            f"{expected}, got {h.hexdigest()}. Reinstall with: {INSTALL}"
        )


# --------------------------------------------------------------------------------------------
# R lazy-load databases
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _reflow(text: str) -> str:
    """Join hard-wrapped lines into one line per paragraph; paragraphs split by blank lines."""
    paras = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    flowed = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paras)
    return "\n\n".join(re.sub(r"[ \t]+", " ", p) for p in flowed if p)


def _austen(paths: list[Path]) -> list[str]:
    books = read_lazydata(paths[0], paths[1])
    missing = set(_AUSTEN_BOOKS) - set(books)
    if missing:
        raise AssetError(f"janeaustenr data lacks {sorted(missing)}")
    return [_reflow("\n".join(str(line) for line in books[b])) for b in _AUSTEN_BOOKS]


def _mobydick(paths: list[Path]) -> list[str]:
    raw = str(read_lazydata(paths[0], paths[1])["mobydick"][0]).lstrip("\ufeff")
    start = raw.find("*** START OF")
    end = raw.find("*** END OF")
    if start < 0 or end < 0:
        raise AssetError("unexpected Moby-Dick text: Gutenberg markers not found")
    body = raw[raw.index("\n", start) : end]
    return [_reflow(body)]


def _jargon(paths: list[Path]) -> list[str]:
    raw = gzip.decompress(paths[0].read_bytes()).decode("utf-8")
    start = raw.find("This is the Jargon File, a comprehensive compendium")
    if start < 0:
        raise AssetError("unexpected Jargon File text: its introduction was not found")
    return [_reflow(raw[start:])]


def _pydocs(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(paths[0].glob("*.rst.txt"))]


_READERS = {"austen": _austen, "mobydick": _mobydick, "jargon": _jargon, "pydocs": _pydocs}


@functools.lru_cache(maxsize=8)
def documents(name: str) -> tuple[str, ...]:
    """The documents of corpus ``name`` (books, or files), normalised (see the module doc)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    return tuple(_READERS[name](_checked(CORPORA[name])))


def text(name: str) -> str:
    """Corpus ``name`` as one string (documents separated by blank lines)."""
    return "\n\n".join(documents(name))


def installed() -> bool:
    """Whether every corpus is unpacked and passes its checksums."""
    try:
        for corpus in CORPORA.values():
            _checked(corpus)
    except AssetError:
        return False
    return True


def _main(argv: Sequence[str]) -> int:
    if list(argv[:1]) != ["install"]:
        print("usage: python -m tokenmerge.eval.corpora install [ROOT]", file=sys.stderr)
        return 2
    if len(argv) > 1:
        os.environ["TOKENMERGE_DEBIAN"] = argv[1]
    root = debian_root() if installed() else install()
    for name in CORPORA:
        words = sum(len(d.split()) for d in documents(name))
        print(f"{name}: {words} words")
    print(f"unpacked under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
