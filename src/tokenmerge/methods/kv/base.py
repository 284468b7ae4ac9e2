"""What every KV method shares: the view of one layer's cache (:class:`KVContext`), the
selection of kept entries (:func:`select_entries`) and the base class with its budgets
(:class:`KVMethod`). The scorers are one file each in this package."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ...core.budget import as_float
from ...core.reduction import Reduction
from ...core.state import Signals, TokenState
from ..base import Method

QueryFn = Callable[[slice], Tensor]
#: the stats entry that holds the scores of forwards after the prefill (KVzip)
RECONSTRUCTION = "reconstruction"
#: the stats entry that stands in for them at a layer those forwards could not score (a
#: sliding-window layer): the entries' recency, which ranks within that layer only
RECENCY = "recency"


def rank_of(order: Tensor) -> Tensor:
    """The rank of every element along the last dim (0 = first) from ``order``, the
    permutation that sorts them: its inverse."""
    pos = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def ranks(x: Tensor) -> Tensor:
    """The rank of every element of ``x`` along the last dim (0 = the largest; ties go to
    the earlier element)."""
    return rank_of(x.argsort(dim=-1, descending=True, stable=True))


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
        query_fn: post-RoPE queries of the current forward's tokens at a ``slice`` of its
            positions (``start:stop:step``): ``[B, H, n, d]``; only those rows are projected.
        raw_query_fn: the same before RoPE (after any q-norm; Expected Attention's
            statistics).
        rope_fn: this layer's rotary embedding at the given positions ``[T]``: ``(cos, sin)``
            ``[T, d]`` each, so that ``R_p q = q cos_p + rotate_half(q) sin_p``.
        query_rope: ``(cos, sin)`` ``[B, n_new, d]`` with which the current queries were rotated.
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
    raw_query_fn: QueryFn | None = None
    rope_fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    query_rope: tuple[Tensor, Tensor] | None = None
    _memo: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def counts(self) -> Tensor:
        """``[B]`` real entries per sample."""
        return self.valid.sum(1)

    def _last_queries(self, fn: QueryFn | None, kind: str, n: int) -> Tensor:
        """``fn`` over the last ``n`` tokens of the current forward, computed once."""
        if fn is None:
            raise RuntimeError("this cache was not written by a forward whose queries are known")
        n = min(n, self.n_new)
        key = (kind, n)
        if key not in self._memo:
            self._memo[key] = fn(slice(self.n_new - n, self.n_new))
        return self._memo[key]

    def queries(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Post-RoPE queries of the last ``n`` tokens of the current forward.

        Returns ``q [B, H, n, d]``, their original index ``[B, n]`` and validity ``[B, n]``.
        """
        q = self._last_queries(self.query_fn, "q", n)
        sl = slice(self.n_new - q.shape[2], self.n_new)
        return q, self.query_index[:, sl], self.query_valid[:, sl]

    def raw_queries(self, n: int) -> Tensor:
        """Pre-RoPE queries ``[B, H, n, d]`` of the last ``n`` tokens of the current forward."""
        return self._last_queries(self.raw_query_fn, "raw_q", n)

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

    def attention_blocks(
        self, block: int = 256, stride: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The attention of the queries of the current forward, ``block`` positions at a time.

        Yields ``(real, a)`` with ``a [B, H_kv, groups, m, L']``: the probabilities of ``m``
        queries over the first ``L'`` stored entries, the rest of which lie in the future of
        every query of the block (causal blocks are skipped, not computed and masked), and
        ``real [B, m]``, which of those queries are real tokens (rows of padding queries are
        garbage: weight them by ``real``). ``stride > 1`` takes every ``stride``-th query
        only, counted from the last query back (so left padding does not move the sample);
        only those queries are projected, and blocks still span ``block`` positions, so the
        causal skip stays as fine. Grouped-query attention is computed per KV head, without
        repeating the keys.
        """
        if self.query_fn is None:
            raise RuntimeError("the queries of this forward are not available")
        b, hk, l, d = self.keys.shape
        g = self.groups
        old = l - self.n_new  # entries stored before this forward; the new ones follow in order
        neg = torch.finfo(torch.float32).min  # finite: fully masked rows stay NaN-free
        holes = not bool(self.valid.all())
        k_index = self.index[:, 0]  # [B, L]
        first = (self.n_new - 1) % stride if self.n_new else 0
        span = stride * max(1, block // stride)  # positions per block, whole strides
        for s in range(first, self.n_new, span):
            e = min(s + span, self.n_new)
            q = self.query_fn(slice(s, e, stride)).float() * self.scale
            q_idx = self.query_index[:, s:e:stride]
            m, vis = q.shape[2], old + e
            q = q.reshape(b, hk, g * m, d)
            logits = q @ self.keys[:, :, :vis].float().transpose(-2, -1)
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            logits = logits.view(b, hk, g, m, vis)
            if holes:  # padding and empty slots
                logits.masked_fill_(~self.valid[:, None, None, None, :vis], neg)
            # the block's own new entries: causal by original index
            diag = logits[..., old + s : vis]
            future = k_index[:, None, old + s : vis] > q_idx[:, :, None]  # [B, m, e - s]
            diag.masked_fill_(future[:, None, None], neg)
            yield self.query_valid[:, s:e:stride], torch.softmax(logits, dim=-1)

    def attention_sum(self, block: int = 256, stride: int = 1) -> Tensor:
        """``[B, H, L]``: attention received by each entry, summed over every real query of
        the current forward (every ``stride``-th one), by :meth:`attention_blocks`: blocks
        of ``block`` positions, causal blocks skipped, so its cost is about one ``QKᵀ`` of the
        fused attention (divided by ``stride``)."""
        key = ("attn_sum", stride)
        if key not in self._memo:
            b, hk, l, _ = self.keys.shape
            total = self.keys.new_zeros(b, hk, self.groups, l, dtype=torch.float32)
            all_real = bool(self.query_valid.all())
            for real, a in self.attention_blocks(block, stride):
                if all_real:
                    part = a.sum(3)
                else:  # padding queries weigh 0: one matmul instead of a mask pass
                    w = real[:, None, None, None, :].to(a.dtype)
                    part = (w @ a).squeeze(3)
                total[..., : a.shape[-1]] += part
            self._memo[key] = total.view(b, hk * self.groups, l)
        return self._memo[key]

    def group_mean(self, x: Tensor) -> Tensor:
        """Average ``[B, H, ...]`` over the query heads of each KV head: ``[B, H_kv, ...]``."""
        b, h = x.shape[:2]
        return x.view(b, h // self.groups, self.groups, *x.shape[2:]).mean(2)

    def recent(self, n: Tensor | int) -> Tensor:
        """``[B, H_kv, L]`` bool: the ``n`` (per sample) most recent real entries of each head."""
        idx = self.index.masked_fill(~self.valid[:, None, :], -1)
        rank = ranks(idx)
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


def ragged_index(chosen: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head kept sets ``chosen [B, H, L]`` (heads may keep different numbers) as the
    cache's layout: ``index [B, H, K]`` of each head's kept entries in their original order,
    left-padded with empty slots (``K`` = the most any head keeps), and ``slot_valid [B, H,
    K]``."""
    l = chosen.shape[-1]
    k = int(chosen.sum(-1).max()) if chosen.numel() else 0
    ar = torch.arange(l, device=chosen.device)
    # empty slots sort first (-1): each head's kept entries end up right-aligned, in order
    picked = torch.where(chosen, ar, -1).sort(dim=-1).values[..., l - k :]
    return picked.clamp_min(0), picked >= 0


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
        layer_budget: ``"uniform"`` (every layer removes ``ratio``) or ``"pyramid"``
            (PyramidKV's arithmetic schedule, more entries at the lower layers, the same
            total; see :func:`~tokenmerge.methods.kv.pyramid.pyramid_ratios`). A per-layer
            ``ratio`` tuple is used as given.
        pyramid_beta: PyramidKV's ``beta``: the top layer keeps ``1/beta`` of the mean budget.
    """

    site: ClassVar[str] = "kv"
    #: the method keeps per-entry statistics across forwards (chunked prefill)
    stateful: ClassVar[bool] = False
    #: the method scores after the whole prefill with extra forwards (KVzip): the adapter
    #: defers the prefill's eviction until they have run
    reconstructs: ClassVar[bool] = False
    #: the method also evicts while decoding, holding each layer at its prefill budget (TOVA)
    decode_evict: ClassVar[bool] = False
    #: heads may keep different numbers of entries (AdaKV); such a cache is not evicted again
    ragged: ClassVar[bool] = False

    ratio: float | Sequence[float] = 0.0
    per_head: bool = True
    layer_budget: Literal["uniform", "pyramid"] = "uniform"
    pyramid_beta: float = 20.0

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
        if self.pyramid_beta < 1.0:
            raise ValueError(f"pyramid_beta must be >= 1, got {self.pyramid_beta}")
        if self.layer_budget == "pyramid" and isinstance(self.ratio, tuple):
            raise ValueError(
                'layer_budget="pyramid" derives the per-layer ratios from one ratio; got a '
                "per-layer tuple (pass one float, or the tuple with layer_budget='uniform')"
            )

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
    def ratio_at(self, layer: int, depth: int) -> float:
        """The fraction removed at ``layer`` of a model with ``depth`` decoder layers."""
        if isinstance(self.ratio, tuple):
            return self.ratio[layer]
        if self.layer_budget == "pyramid":
            from .pyramid import pyramid_ratios

            return pyramid_ratios(float(self.ratio), depth, self.pyramid_beta)[layer]
        return float(self.ratio)

    @property
    def scoring(self) -> KVMethod:
        """The method whose scores select the entries: itself, or a wrapper's scorer."""
        return self

    def extra_forwards(self, n: int) -> int:
        """Forwards beyond the prefill that scoring a context of ``n`` tokens costs."""
        return 0

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

    def keep(self, n: Tensor, layer: int, depth: int) -> Tensor:
        """Entries kept per sample out of ``n`` real ones: ``round(n (1 - ratio))``, at least 1
        (``ratio`` of ``layer`` in a model of ``depth`` layers).

        Samples with fewer than ``min_tokens`` real entries keep everything.
        """
        k = torch.round(n.double() * (1.0 - self.ratio_at(layer, depth))).long()
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
        """The entries to keep: ``index [B, H_kv, K]`` and ``slot_valid [B, K]`` (``[B, H_kv,
        K]`` for :attr:`ragged` methods, whose heads keep different numbers)."""
        scores = self.score(ctx)
        own = self.must_keep(ctx, keep)
        if own is not None:
            forced = own if forced is None else forced | own
        if not self.per_head:
            scores = scores.mean(1, keepdim=True).expand_as(scores)
            if forced is not None:
                forced = forced.any(1, keepdim=True).expand_as(forced)
        return select_entries(scores, ctx.valid, keep, forced)

    def select_layers(
        self,
        ctxs: dict[int, KVContext],
        keeps: dict[int, Tensor],
        forced: dict[int, Tensor | None] | None = None,
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """:meth:`select` for several layers evicted together (a prefill whose eviction
        waited for all of them, or :func:`~tokenmerge.adapters.hf_decoder.compress`). Each
        layer selects by itself here; a method that shares one budget across layers
        (:attr:`shares_layers`, KVzip's global ranking) overrides this, keeping
        ``Σ_l H · keeps[l]`` entries in all."""
        forced = forced or {}
        return {i: self.select(c, keeps[i], forced.get(i)) for i, c in ctxs.items()}

    @property
    def shares_layers(self) -> bool:
        """Layers keep different numbers of entries, out of one budget for all of them."""
        return False

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        raise TypeError(
            f"{type(self).__name__} acts on the KV cache: it is driven by the hf-decoder adapter "
            "(tm.apply on a decoder LLM), not by the block patch engine"
        )
