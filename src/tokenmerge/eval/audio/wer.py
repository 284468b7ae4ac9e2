"""Word error rate for speech transcripts, after a small, explicit text normalisation.

`normalize` is deliberately much smaller than Whisper's ``EnglishTextNormalizer``; it does
exactly this, in order:

1. lower-cases, and turns the typographic apostrophes ``‘ ’`` into ``'``;
2. joins Austen's hyphenated ``to-morrow``, ``to-day``, ``to-night`` (Whisper writes
   "tomorrow");
3. replaces every ASCII punctuation character except ``'`` with a space, so
   ``"cold-hearted"`` and ``"cold hearted"`` agree, and ``"Mr."`` becomes ``"mr"``;
4. keeps an apostrophe only between two letters or digits (``"don't"``, ``"dashwood's"``) and
   drops it elsewhere (quotes, ``"the dashwoods'"``);
5. spells out three titles as whole words: ``mr`` → ``mister``, ``mrs`` → ``missus``,
   ``dr`` → ``doctor``. The LibriVox transcripts spell "mister" out while Whisper writes
   "Mr."; Austen's sentences (the espeak clips) are full of "Mr."/"Mrs.", which espeak reads
   as "mister"/"missus";
6. collapses runs of whitespace.

Not normalised, on purpose: digits vs number words (the references here only hold number
words, so a hypothesis "10 of clubs" for "ten of clubs" counts one error), British vs American
spelling ("recognise" vs "recognize" counts one error), contractions ("don't" vs "do not"), fillers,
and non-ASCII punctuation. These errors are the same for a reduced and an unreduced model, so
they shift both WERs alike; compare the two, not the absolute value with published numbers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["TITLES", "normalize", "per_clip_wer", "wer", "word_errors"]

#: the abbreviations that `normalize` spells out (whole words, after punctuation is removed)
TITLES: dict[str, str] = {"mr": "mister", "mrs": "missus", "dr": "doctor"}

_PUNCT = re.compile("[" + re.escape(string.punctuation.replace("'", "")) + "]")
_TO_WORDS = re.compile(r"\bto-(morrow|day|night)\b")
_LOOSE_APOSTROPHE = re.compile(r"(?<![^\W_])'|'(?![^\W_])")  # not between two letters/digits


def normalize(text: str) -> str:
    """`text` lower-cased, without ASCII punctuation, titles spelled out, one space between
    words (the exact rules are in the module docstring)."""
    s = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    s = _TO_WORDS.sub(r"to\1", s)
    s = _LOOSE_APOSTROPHE.sub(" ", _PUNCT.sub(" ", s))
    return " ".join(TITLES.get(w, w) for w in s.split())


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word lists (substitution, insertion, deletion cost 1),
    by dynamic programming over one row at a time."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """``(errors, reference words)``: the word-level edit distance between the normalised
    reference and hypothesis, and the number of words in the normalised reference."""
    r, h = normalize(ref).split(), normalize(hyp).split()
    return _edit_distance(r, h), len(r)


def _pairs(refs: Sequence[str], hyps: Sequence[str]) -> list[tuple[int, int]]:
    if isinstance(refs, str) or isinstance(hyps, str):
        raise TypeError("refs and hyps must be sequences of transcripts, not single strings")
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")
    return [word_errors(r, h) for r, h in zip(refs, hyps, strict=True)]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER: the sum of word errors over the sum of reference words (so long clips weigh
    more than short ones). Can exceed 1 when the hypotheses insert many words."""
    pairs = _pairs(refs, hyps)
    words = sum(n for _, n in pairs)
    if words == 0:
        raise ValueError("the references hold no words after normalisation; WER is undefined")
    return sum(e for e, _ in pairs) / words


def per_clip_wer(refs: Sequence[str], hyps: Sequence[str]) -> list[float]:
    """The WER of each clip on its own (errors / reference words)."""
    out = []
    for i, (errors, words) in enumerate(_pairs(refs, hyps)):
        if words == 0:
            raise ValueError(f"reference {i} ({refs[i]!r}) holds no words after normalisation")
        out.append(errors / words)
    return out
