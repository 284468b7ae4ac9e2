"""Measurements on a (compressed) cache: greedy needle answers, continuation NLL, and the
statistics reported over trials."""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...adapters import hf_decoder as hd

#: separators a model may put inside a number ("12,345", "12 345")
_INNER_SEP = re.compile(r"(?<=\d)[,\s](?=\d)")


def stop_ids(model: nn.Module, tok: Any) -> set[int]:
    """Token ids that end an answer: the tokenizer's and the generation config's EOS."""
    ids = {tok.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


@torch.inference_mode()
def greedy_answer(
    model: nn.Module,
    cache: Any,
    prompt: Tensor,
    tok: Any,
    key: str | None = None,
    max_new: int = 12,
    stop: set[int] | None = None,
) -> tuple[bool, str]:
    """Greedy decoding of up to ``max_new`` tokens after ``prompt``, fed on a fork of ``cache``
    (one forward per token, the model's own cache path, so methods that evict while decoding
    do so). Returns whether the answer contains ``key`` (separators inside numbers ignored)
    and the answer text; stops at an end-of-answer token or as soon as the key appears."""
    cache = hd.fork_cache(cache)
    kw = hd.cache_kw(model, cache)
    stop = stop_ids(model, tok) if stop is None else stop
    x, out = prompt, []
    text = ""
    for _ in range(max_new):
        logits = model(input_ids=x, **kw, use_cache=True, logits_to_keep=1).logits
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        text = tok.decode(out, skip_special_tokens=True)
        if key is not None and key in _INNER_SEP.sub("", text):
            return True, text
        x = torch.tensor([[nxt]], device=prompt.device)
    return False, text


@torch.inference_mode()
def continuation_nll(
    model: nn.Module, cache: Any, tokens: Tensor, skip: int = 0
) -> tuple[float, int]:
    """Feed ``tokens`` on a fork of ``cache``; summed negative log-likelihood of
    ``tokens[skip + 1:]`` (each predicted from the token before it) and their count."""
    kw = hd.cache_kw(model, hd.fork_cache(cache))
    logits = model(input_ids=tokens, **kw, use_cache=True).logits
    return nll_of(logits[0, skip:-1], tokens[0, skip + 1 :])


def nll_of(logits: Tensor, targets: Tensor) -> tuple[float, int]:
    """Summed NLL of ``targets [n]`` under ``logits [n, V]`` and ``n``."""
    logp = torch.log_softmax(logits.float(), -1)
    return float(-logp.gather(1, targets[:, None]).sum()), targets.shape[0]


# --------------------------------------------------------------------------------------------
# Statistics over trials
# --------------------------------------------------------------------------------------------


def proportion(xs: Sequence[bool]) -> tuple[float | None, float | None, int]:
    """Mean, standard error ``sqrt(p (1 - p) / n)`` and ``n`` of binary outcomes."""
    n = len(xs)
    if not n:
        return None, None, 0
    p = sum(map(bool, xs)) / n
    return p, math.sqrt(p * (1.0 - p) / n), n


def ppl_ratio(
    nll: Sequence[float], tokens: Sequence[int], base: Sequence[float], base_tokens: Sequence[int]
) -> tuple[float | None, float | None]:
    """Pooled perplexity ratio ``exp((Σ nll - Σ nll_base) / Σ tokens)`` over trials, and its
    standard error by the delta method on the per-trial log ratios (``None`` with < 2 trials).
    """
    if not nll or not base or sum(tokens) == 0:
        return None, None
    if list(tokens) != list(base_tokens):
        raise ValueError("perplexity ratios need the same tokens scored in every trial")
    ratio = math.exp((sum(nll) - sum(base)) / sum(tokens))
    if len(nll) < 2:
        return ratio, None
    # per-token log ratio of each trial, weighted by its tokens
    d = [(a - b) / n for a, b, n in zip(nll, base, tokens, strict=True)]
    w = [n / sum(tokens) for n in tokens]
    mean = sum(wi * di for wi, di in zip(w, d, strict=True))
    var = sum(wi * wi * (di - mean) ** 2 for wi, di in zip(w, d, strict=True))
    var *= len(d) / (len(d) - 1)  # unbiased for equal weights
    return ratio, ratio * math.sqrt(var)


def spread_of(xs: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Median and interquartile range (``min``/``max`` with fewer than 4 values)."""
    if not xs:
        return None, None, None
    med = statistics.median(xs)
    if len(xs) < 4:
        return med, min(xs), max(xs)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return med, q1, q3


def mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(statistics.fmean(xs)) if xs else None


@dataclass
class Acc:
    """One configuration's measurements, one entry per trial (in trial order)."""

    agnostic: list[bool] = field(default_factory=list)
    aware: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    nll_aware: list[float] = field(default_factory=list)
    tokens_aware: list[int] = field(default_factory=list)
    kv_final: list[float] = field(default_factory=list)
    kv_kept: list[float] = field(default_factory=list)
    kv_peak: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    def extend(self, other: Acc) -> None:
        """Append ``other``'s trials (measured after this one's) to this one's."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def by_length(self) -> dict[int, tuple[float | None, float | None, int]]:
        """Query-agnostic needle accuracy per haystack length: ``(mean, se, n)``."""
        out: dict[int, list[bool]] = {}
        for length, ok in zip(self.lengths, self.agnostic, strict=True):
            out.setdefault(length, []).append(ok)
        return {k: proportion(v) for k, v in sorted(out.items())}
