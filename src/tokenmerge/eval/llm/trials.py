"""Needle trials in the model's chat template (kvpress's query-agnostic protocol).

A trial is a user turn holding a haystack of real English text with a pass key sentence at
some depth, then the question. The chat template is rendered around a placeholder message
and split there (:func:`chat_split`): the **context** is the template's prefix plus the
haystack, so it can be compressed before the question is seen; the **question** is the
question text, the end of the user turn, the assistant's start and RULER's answer prefix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
#: the start of the assistant's answer (RULER's answer prefix): without it SmolLM2-135M often
#: spends its ~12 answer tokens restating the question (0.62 instead of 0.92 at 2048 tokens)
ANSWER_PREFIX = "The pass key is"
#: placeholders of :func:`chat_split` (control characters no template produces)
_CONTEXT, _SEP = "\x1fTOKENMERGE-CONTEXT\x1f", "\x1fTOKENMERGE-SEP\x1f"


def chat_split(tok: Any) -> tuple[str, str]:
    """The chat template's text around a user message: ``(prefix, suffix)``.

    The template is rendered for the message ``CONTEXT + SEP`` with the generation prompt, as
    kvpress's pipeline does; ``prefix`` is what comes before the context (system prompt, start
    of the user turn) and ``suffix`` what follows the separator (end of the user turn, start
    of the assistant's). A tokenizer without a chat template gives ``("", "\\n\\n")``.
    """
    if not getattr(tok, "chat_template", None):
        return "", "\n\n"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": _CONTEXT + _SEP}], add_generation_prompt=True, tokenize=False
    )
    prefix, found, rest = rendered.partition(_CONTEXT)
    between, found_sep, suffix = rest.partition(_SEP)
    if not found or not found_sep or between:
        raise ValueError("the chat template rewrites the user message; it cannot be split")
    return prefix, suffix


@dataclass
class Trial:
    """One needle trial, each tensor ``[1, n]``.

    Attributes:
        context: template prefix + haystack with the needle (compressed in the agnostic mode).
        question: question + template suffix + answer prefix (fed after the context).
        continuation: the real text that follows the haystack in its book (perplexity).
        length: haystack tokens (the needle and the template come on top).
    """

    corpus: str
    length: int
    depth: float
    key: str
    context: Tensor
    question: Tensor
    continuation: Tensor


def ids_of(tok: Any, s: str) -> list[int]:
    """Token ids of ``s`` without special tokens added (the template spells its own)."""
    return tok(s, add_special_tokens=False).input_ids


def _window(tok: Any, text: str, n: int, rng: random.Random) -> list[int]:
    """``n`` tokens of ``text`` from a random paragraph start."""
    chars = 8 * n
    for _ in range(8):
        start = rng.randrange(0, max(len(text) - chars, 1))
        start = text.find("\n\n", start)
        start = 0 if start < 0 else start + 2
        ids = ids_of(tok, text[start : start + chars])
        if len(ids) >= n:
            return ids[:n]
        chars *= 2
    raise ValueError(f"the corpus is too short for {n} tokens")


def depths(n: int) -> list[float]:
    """``n`` needle depths spread evenly over [0.1, 0.9] (0.5 for one trial)."""
    return [0.5] if n == 1 else [0.1 + 0.8 * i / (n - 1) for i in range(n)]


def make_trials(
    tok: Any,
    lengths: Sequence[int],
    n: int,
    corpora: Sequence[str],
    continuation: int,
    seed: int = 0,
) -> list[Trial]:
    """``n`` needle trials per haystack length, at :func:`depths`, the corpora in turn."""
    from .. import corpora as C

    rng = random.Random(seed)
    prefix, suffix = chat_split(tok)
    head = ids_of(tok, prefix)
    question = torch.tensor([ids_of(tok, QUESTION + suffix + ANSWER_PREFIX)])
    out = []
    k = 0
    for length in lengths:
        for depth in depths(n):
            name = corpora[k % len(corpora)]
            k += 1
            ids = _window(tok, C.text(name), length + continuation, rng)
            hay, cont = ids[:length], ids[length:]
            key = str(rng.randrange(10000, 100000))
            at = int(depth * length)
            ctx = head + hay[:at] + ids_of(tok, NEEDLE.format(key=key)) + hay[at:]
            out.append(
                Trial(
                    corpus=name,
                    length=length,
                    depth=depth,
                    key=key,
                    context=torch.tensor([ctx]),
                    question=question,
                    continuation=torch.tensor([cont]),
                )
            )
    return out


def spread(total: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(total)`` (first and last included)."""
    k = min(k, total)
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(j * (total - 1) / (k - 1)) for j in range(k)})
