"""KV-cache methods: which cached keys and values a decoder LLM keeps (the ``"kv"`` site).

A KV method scores every entry of one layer's cache and keeps the best ones. The adapter
(:mod:`tokenmerge.adapters.hf_decoder`) calls it right after that layer's attention, so the
prefill itself is exact and each layer's cache is shrunk as soon as it is written (peak memory
falls as well as the final size). Scores are ``[B, H_kv, L]``: one per KV head and entry, so
every scorer works with grouped-query attention (query heads are averaged within their group).

Budgets. ``ratio`` is the fraction of each sequence's entries that is *removed* (kvpress's
``compression_ratio``): ``0.5`` is 2x compression, ``0.75`` is 4x, ``0.875`` is 8x. It may be
a tuple with one value per layer. Each sample keeps ``round(n_b (1 - ratio))`` of its own ``n_b``
real entries, so padding never counts and never survives. ``per_head=True`` (the default, as in
kvpress and SnapKV) lets every KV head keep its own entries, with the same number per head;
``False`` averages the scores over heads and keeps one set for all of them.

Scorers (higher = keep):

=================  ==============================================================  =========
name               score of entry ``j``                                            needs
=================  ==============================================================  =========
``streaming_llm``  ``+inf`` for the first ``sinks`` tokens, else the position      nothing
``snapkv``         pooled attention from the last ``window`` queries               queries
``h2o``            attention accumulated over every query so far (+ recent half)   queries
``knorm``          ``-||k_j||``                                                     keys
``random_kv``      a hash of (seed, layer, head, position)                         nothing
=================  ==============================================================  =========

Attention for scoring is computed explicitly (``softmax(q Kᵀ/√d)``) at the scored layer only,
for the queries a scorer asks for; the model's own attention keeps its fused kernel. Kept keys
keep the RoPE phase of their original position (no re-rotation), and later tokens continue at
their original positions.

Layers with a sliding window (Mistral, Gemma 3's local layers) are compressed too when they
hold the whole prefill; when the prefill is longer than the window they already hold only the
window and are left alone.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.budget import as_float
from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, register

QueryFn = Callable[[int, int], Tensor]


# --------------------------------------------------------------------------------------------
# What a scorer sees
# --------------------------------------------------------------------------------------------


@dataclass
class KVContext:
    """One layer's cache, as a KV method sees it right after that layer's attention.

    Attributes:
        layer: index of the decoder layer.
        keys, values: ``[B, H_kv, L, d]`` every stored entry, post-RoPE (what attention used);
            the last ``n_new`` were written by the current forward.
        index: ``[B, H_kv, L]`` original index of each entry in the full token stream
            (``-1``: an empty slot left by an earlier eviction).
        valid: ``[B, L]`` the entry is a real token (not padding, not an empty slot). Every
            head holds the same number of real entries, so validity does not depend on the head.
        position: ``[B, H_kv, L]`` position of each entry within its own sequence, padding not
            counted (0 = the sample's first real token).
        n_new: entries written by the current forward (its queries are available).
        scale: the attention's logit scale.
        groups: query heads per KV head (GQA).
        query_index, query_valid: ``[B, n_new]`` original index and validity of the current
            forward's tokens (its queries).
        stats: running per-entry statistics of stateful methods (e.g. H2O's accumulated
            attention), ``[B, H_kv, L]`` each, aligned with the entries.
        softcap: logit soft-capping of the model (Gemma 2 style), or ``None``.
    """

    layer: int
    keys: Tensor
    values: Tensor
    index: Tensor
    valid: Tensor
    position: Tensor
    n_new: int
    scale: float
    groups: int
    query_index: Tensor
    query_valid: Tensor
    query_fn: QueryFn | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    softcap: float | None = None
    _memo: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def counts(self) -> Tensor:
        """``[B]`` real entries per sample."""
        return self.valid.sum(1)

    def queries(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Post-RoPE queries of the last ``n`` tokens of the current forward.

        Returns ``q [B, H, n, d]``, their original index ``[B, n]`` and validity ``[B, n]``.
        """
        if self.query_fn is None:
            raise RuntimeError("this cache was not written by a forward whose queries are known")
        n = min(n, self.n_new)
        key = ("q", n)
        if key not in self._memo:
            self._memo[key] = self.query_fn(self.n_new - n, self.n_new)
        sl = slice(self.n_new - n, self.n_new)
        return self._memo[key], self.query_index[:, sl], self.query_valid[:, sl]

    def _logits(self, q: Tensor, q_index: Tensor) -> Tensor:
        """Masked attention logits ``[B, H, m, L]`` of queries ``q`` over every stored entry."""
        k = self.keys.repeat_interleave(self.groups, dim=1)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        # a key is visible if it is real and not in the query's future (original order)
        k_index = self.index[:, :1]  # [B, 1, L]; the future test only involves new entries
        allowed = self.valid[:, None, None, :] & (
            k_index[:, :, None, :] <= q_index[:, None, :, None]
        )
        return logits.masked_fill(~allowed, -math.inf)

    def attention(self, n: int) -> Tensor:
        """Attention probabilities ``[B, H, n, L]`` of the last ``n`` queries of this forward
        (rows of padding queries are 0)."""
        key = ("attn", n)
        if key not in self._memo:
            q, qi, qv = self.queries(n)
            a = torch.softmax(self._logits(q, qi).float(), dim=-1).nan_to_num(0.0)
            self._memo[key] = a * qv[:, None, :, None]
        return self._memo[key]

    def attention_sum(self, block: int = 256) -> Tensor:
        """``[B, H, L]``: attention received by each entry, summed over every real query of
        the current forward (computed in blocks of ``block`` queries to bound memory)."""
        key = ("attn_sum",)
        if key not in self._memo:
            if self.query_fn is None:
                raise RuntimeError("the queries of this forward are not available")
            total = None
            for s in range(0, self.n_new, block):
                e = min(s + block, self.n_new)
                q = self.query_fn(s, e)
                a = torch.softmax(self._logits(q, self.query_index[:, s:e]).float(), dim=-1)
                a = a.nan_to_num(0.0) * self.query_valid[:, None, s:e, None]
                part = a.sum(2)
                total = part if total is None else total + part
            if total is None:  # no new tokens
                b, h = self.keys.shape[0], self.keys.shape[1] * self.groups
                total = self.keys.new_zeros(b, h, self.length, dtype=torch.float32)
            self._memo[key] = total
        return self._memo[key]

    def group_mean(self, x: Tensor) -> Tensor:
        """Average ``[B, H, ...]`` over the query heads of each KV head: ``[B, H_kv, ...]``."""
        b, h = x.shape[:2]
        return x.view(b, h // self.groups, self.groups, *x.shape[2:]).mean(2)

    def recent(self, n: Tensor | int) -> Tensor:
        """``[B, H_kv, L]`` bool: the ``n`` (per sample) most recent real entries of each head."""
        idx = self.index.masked_fill(~self.valid[:, None, :], -1)
        order = idx.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(self.length, device=idx.device).expand_as(order)
        )
        n_t = torch.as_tensor(n, device=idx.device).reshape(-1, 1, 1)
        return (rank < n_t) & self.valid[:, None, :]


# --------------------------------------------------------------------------------------------
# Selection (shared by every scorer and by the adapter)
# --------------------------------------------------------------------------------------------


def select_entries(
    scores: Tensor, valid: Tensor, keep: Tensor, forced: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The entries to keep, per sample and head.

    Args:
        scores: ``[B, H, L]`` (higher = keep).
        valid: ``[B, L]`` real entries; the others are never kept.
        keep: ``[B]`` entries to keep per head (clamped to the real ones).
        forced: ``[B, H, L]`` entries kept whatever their score (windows, sinks).

    Returns:
        ``index [B, H, K]`` of the kept entries in their original order, left-padded with
        empty slots (``K = max keep``), and ``slot_valid [B, K]`` (False for empty slots). Ties
        are broken towards the earlier entry, so the choice never depends on the batch.
    """
    b = scores.shape[0]
    keep = torch.minimum(keep.to(scores.device), valid.sum(1))
    s = scores.float().nan_to_num(nan=-3e38, posinf=3e38, neginf=-3e38).clamp(-3e38, 3e38)
    if forced is not None:
        s = torch.where(forced, torch.full_like(s, math.inf), s)
    s = s.masked_fill(~valid[:, None, :], -math.inf)
    k = int(keep.max()) if b else 0
    order = s.argsort(dim=-1, descending=True, stable=True)[..., :k]
    rank = torch.arange(k, device=s.device)
    chosen = rank < keep[:, None, None]
    # empty slots sort first (-1), so the kept entries end up right-aligned, in order
    picked = torch.where(chosen, order, -1).sort(dim=-1).values
    return picked.clamp_min(0), picked[:, 0] >= 0


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


@dataclass
class KVMethod(Method):
    """Base of the KV-cache methods (site ``"kv"``).

    Subclasses implement :meth:`score`; stateful ones also :meth:`update_stats`, and those that
    must keep some entries whatever their score (H2O's recent half) :meth:`must_keep`.

    Attributes:
        ratio: fraction of each sequence's cache removed (0 = nothing, 0.75 = 4x); a float, or
            one value per decoder layer.
        per_head: each KV head keeps its own entries (True), or all heads keep the entries
            with the best head-averaged score (False).
    """

    site: ClassVar[str] = "kv"
    #: the method keeps per-entry statistics across forwards (chunked prefill)
    stateful: ClassVar[bool] = False

    ratio: float | Sequence[float] = 0.0
    per_head: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r != 0:
            raise ValueError(
                f"{type(self).__name__} is a KV-cache method: set its budget with ratio= "
                "(fraction of the cache removed, e.g. 0.75 for 4x), not r="
            )
        if self.prop_attn:
            raise ValueError("proportional attention does not apply to KV-cache methods")
        self.ratio = self._as_ratio(self.ratio, f"{type(self).__name__}.ratio")

    @staticmethod
    def _as_ratio(ratio: Any, name: str) -> float | tuple[float, ...]:
        """A fraction in [0, 1), or one per layer (a list, tuple or 1-d array) as a tuple."""
        hint = " (the fraction of the cache removed, e.g. 0.75 for 4x; or one per layer)"
        if getattr(ratio, "ndim", None) == 1 and hasattr(ratio, "tolist"):
            ratio = ratio.tolist()
        if not isinstance(ratio, (list, tuple)):
            return as_float(ratio, name, lo=0.0, hi=1.0, hi_open=True, hint=hint)
        if not ratio:
            raise ValueError(f"{name} is an empty list: give one fraction per layer{hint}")
        return tuple(
            as_float(x, f"{name}[{i}]", lo=0.0, hi=1.0, hi_open=True, hint=hint)
            for i, x in enumerate(ratio)
        )

    @classmethod
    def example(cls, r: int) -> KVMethod:
        """``r == 0``: keep everything; otherwise remove half the cache."""
        return cls(ratio=0.0 if r == 0 else 0.5)

    # -------------------------------------------------------------- budget
    def ratio_at(self, layer: int) -> float:
        if isinstance(self.ratio, tuple):
            return self.ratio[layer]
        return float(self.ratio)

    def check_depth(self, depth: int) -> None:
        """Raise if per-layer ratios do not match a model of ``depth`` layers."""
        if isinstance(self.ratio, tuple) and len(self.ratio) != depth:
            raise ValueError(
                f"{type(self).__name__} has {len(self.ratio)} per-layer ratios but the model "
                f"has {depth} decoder layers"
            )

    @property
    def is_identity(self) -> bool:
        """True when no layer removes anything."""
        rs = self.ratio if isinstance(self.ratio, tuple) else (self.ratio,)
        return all(x == 0.0 for x in rs)

    def keep(self, n: Tensor, layer: int) -> Tensor:
        """Entries kept per sample out of ``n`` real ones: ``round(n (1 - ratio))``, at least 1.

        Samples with fewer than ``min_tokens`` real entries keep everything.
        """
        k = torch.round(n.double() * (1.0 - self.ratio_at(layer))).long()
        k = torch.maximum(k, torch.ones_like(k)).minimum(n)
        return torch.where(n < self.min_tokens, n, k)

    # -------------------------------------------------------------- scoring
    @abstractmethod
    def score(self, ctx: KVContext) -> Tensor:
        """``[B, H_kv, L]`` importance of every entry (higher = keep)."""

    def must_keep(self, ctx: KVContext, keep: Tensor) -> Tensor | None:
        """``[B, H_kv, L]`` entries kept whatever their score, or ``None``."""
        return None

    def update_stats(self, ctx: KVContext) -> dict[str, Tensor]:
        """Running statistics after the current forward (``[B, H_kv, L]`` each, by name)."""
        return {}

    def select(
        self, ctx: KVContext, keep: Tensor, forced: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The entries to keep: ``index [B, H_kv, K]`` and ``slot_valid [B, K]``."""
        scores = self.score(ctx)
        own = self.must_keep(ctx, keep)
        if own is not None:
            forced = own if forced is None else forced | own
        if not self.per_head:
            scores = scores.mean(1, keepdim=True).expand_as(scores)
            if forced is not None:
                forced = forced.any(1, keepdim=True).expand_as(forced)
        return select_entries(scores, ctx.valid, keep, forced)

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        raise TypeError(
            f"{type(self).__name__} acts on the KV cache: it is driven by the hf-decoder adapter "
            "(tm.apply on a decoder LLM), not by the block patch engine"
        )


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


@register
@dataclass
class StreamingLLM(KVMethod):
    """StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus the most recent tokens.

    "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.

    Keep the first ``sinks`` tokens of each sequence (the attention sinks) and the most recent
    ones: with ``p_j`` the position of entry ``j`` in its own sequence,
    ``score_j = +inf if p_j < sinks else p_j``. Positions are the original ones (no key
    re-rotation: kept keys keep the RoPE phase they were written with).
    """

    name: ClassVar[str] = "streaming_llm"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, ctx: KVContext) -> Tensor:
        p = ctx.position.float()
        return p.masked_fill(ctx.position < self.sinks, math.inf)


@register
@dataclass
class SnapKV(KVMethod):
    """SnapKV (Li et al., NeurIPS 2024): pooled attention from an observation window.

    "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.

    With the last ``w = window`` queries of the prefill (the observation window, which holds
    the question in query-aware use) and ``A = softmax(q_W Kᵀ/√d)``::

        s_j   = Σ_{i ∈ W} A_ij                      (per query head)
        s'_j  = (1/k) Σ_{|t| ≤ k//2} s_{j+t}         (1-D average pooling, kernel k = kernel)
        score = mean over the query heads of each KV head of s'

    The window's own entries are always kept. The pooling keeps neighbours of important tokens
    together (the paper's "clustering").
    """

    name: ClassVar[str] = "snapkv"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(
                f"window must be >= 1 and kernel a positive odd number, got window="
                f"{self.window}, kernel={self.kernel}"
            )

    def score(self, ctx: KVContext) -> Tensor:
        a = ctx.attention(self.window)  # [B, H, w, L]
        s = a.sum(2)
        if self.kernel > 1:
            b, h, l = s.shape
            s = F.avg_pool1d(s.reshape(b * h, 1, l), self.kernel, 1, self.kernel // 2)
            s = s.reshape(b, h, l)
        s = ctx.group_mean(s)
        _, q_index, q_valid = ctx.queries(self.window)
        first = q_index.masked_fill(~q_valid, torch.iinfo(q_index.dtype).max).amin(1)
        in_window = ctx.index >= first[:, None, None]
        return s.masked_fill(in_window & ctx.valid[:, None, :], math.inf)


@register
@dataclass
class H2O(KVMethod):
    """H2O (Zhang et al., NeurIPS 2023): accumulated attention (heavy hitters) plus recent tokens.

    "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    arXiv:2306.14048.

    The score of an entry is the attention it has received, accumulated over every query so
    far (across prefill chunks): ``S_j = Σ_i A_ij``, summed over the query heads of each KV
    head. Of the ``k`` entries kept, the ``round(recent · k)`` most recent are kept whatever
    their score (the paper splits the budget evenly); the rest are the heavy hitters.
    Computing ``A`` needs every query of the prefill: an explicit ``QKᵀ`` at each layer.
    """

    name: ClassVar[str] = "h2o"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    stateful: ClassVar[bool] = True
    recent: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must lie in [0, 1], got {self.recent}")

    def update_stats(self, ctx: KVContext) -> dict[str, Tensor]:
        b, _, l = ctx.index.shape
        acc = ctx.attention_sum()
        acc = acc.view(b, -1, ctx.groups, l).sum(2)  # [B, H_kv, L]
        prev = ctx.stats.get(self.name)
        if prev is not None:
            acc = acc + prev
        return {self.name: acc}

    def score(self, ctx: KVContext) -> Tensor:
        acc = ctx.stats.get(self.name)
        if acc is None:
            acc = self.update_stats(ctx)[self.name]
        return acc

    def must_keep(self, ctx: KVContext, keep: Tensor) -> Tensor | None:
        if self.recent == 0.0:
            return None
        return ctx.recent(torch.round(keep.double() * self.recent).long())


@register
@dataclass
class KNorm(KVMethod):
    """Key norm (Devoto et al., EMNLP 2024): keep the keys with the smallest L2 norm.

    "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv:2406.11430.

    Keys with a small L2 norm draw the most attention, so ``score_j = -||k_j||₂`` per KV head.
    Needs no queries and no attention: the cheapest scorer.
    """

    name: ClassVar[str] = "knorm"

    def score(self, ctx: KVContext) -> Tensor:
        return -ctx.keys.float().norm(dim=-1)


def position_hash(seed: int, layer: int, head: Tensor, position: Tensor) -> Tensor:
    """Uniform pseudo-random numbers in [0, 1) from integers, identical on any batch.

    A 32-bit integer hash (two rounds of multiply-xorshift) of
    ``position ⊕ f(seed, layer, head)``, in int64 arithmetic that never overflows.
    """
    m = 0xFFFFFFFF
    x = (position.long() * 0x9E3779B1 + head.long() * 0x85EBCA77) & m
    x = x ^ ((seed * 0xC2B2AE3D + layer * 0x27D4EB2F + 0x165667B1) & m)
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & m
    x = (x >> 16) ^ x
    return x.double() / float(m + 1)


@register
@dataclass
class RandomKV(KVMethod):
    """Random KV eviction: the baseline every scorer must beat (kvpress's RandomPress).

    ``score_j = h(seed, layer, head, p_j)``: a hash of the entry's position in its own
    sequence, so the choice is random but reproducible and independent of batch neighbours.
    """

    name: ClassVar[str] = "random_kv"
    seed: int = 0

    def score(self, ctx: KVContext) -> Tensor:
        head = torch.arange(ctx.index.shape[1], device=ctx.index.device)[None, :, None]
        return position_hash(self.seed, ctx.layer, head, ctx.position).float()


KV_SCORERS: tuple[str, ...] = ("streaming_llm", "snapkv", "h2o", "knorm", "random_kv")
