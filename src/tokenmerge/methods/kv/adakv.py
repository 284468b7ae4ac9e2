"""AdaKV: a layer's cache budget shared across its heads by global top-k over any scorer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..base import REGISTRY, register
from .base import KVContext, KVMethod, ragged_index, rank_of, ranks


def adaptive_select(
    scores: Tensor,
    valid: Tensor,
    keep: Tensor,
    forced: Tensor | None = None,
    alpha: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """Head-adaptive selection: ``H · keep`` entries per sample and layer, shared by the heads.

    Every head first keeps its ``floor(alpha · keep)`` best entries (the safeguard); the rest
    of the layer's budget, ``H · (keep - floor(alpha · keep))``, goes to the best remaining
    entries of *any* head (global top-k over the flattened ``[H, L]`` scores). Forced entries
    score ``+inf``. Ties go to the entry ranked higher within its own head, then to the
    earlier head, so tied heads (e.g. all forced) share the budget evenly.

    Returns:
        ``index [B, H, K]`` of each head's kept entries in their original order, left-padded
        with empty slots (``K`` = the most any head keeps), and ``slot_valid [B, H, K]``.
    """
    b, h, l = scores.shape
    device = scores.device
    keep = torch.minimum(keep.to(device), valid.sum(1))
    s = scores.float().nan_to_num(nan=-3e38, posinf=3e38, neginf=-3e38).clamp(-3e38, 3e38)
    if forced is not None:
        s = torch.where(forced, torch.full_like(s, math.inf), s)
    s = s.masked_fill(~valid[:, None, :], -math.inf)

    guard = torch.floor(keep.double() * alpha).long()
    own = ranks(s)  # rank within the head
    base = (own < guard[:, None, None]) & valid[:, None, :]
    quota = h * (keep - guard)
    rest = s.masked_fill(base, -math.inf).flatten(1)
    # global order: score, then the rank within the head (two stable sorts)
    by_rank = own.flatten(1).argsort(dim=-1, stable=True)
    by_score = rest.gather(1, by_rank).argsort(dim=-1, descending=True, stable=True)
    global_rank = rank_of(by_rank.gather(1, by_score)).view(b, h, l)
    chosen = base | (global_rank < quota[:, None, None]) & valid[:, None, :]
    return ragged_index(chosen)


@register
@dataclass
class AdaKV(KVMethod):
    """Ada-KV (Feng et al. 2024): adaptive per-head budgets over any KV scorer.

    "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
    Inference", arXiv:2407.11550.

    A uniform method gives each of a layer's ``H`` KV heads the same ``k`` entries. Ada-KV
    keeps the layer's total ``B = H · k`` but lets the heads compete for it: with ``s_{h,j}``
    the wrapped scorer's scores, the kept set is the top-``B`` of ``{s_{h,j}}`` over all heads
    and entries, so heads whose attention is concentrated give budget to heads whose attention
    is spread. The paper shows this bounds the L1 loss of the attention output better than any
    uniform split. A safeguard (``alpha``, as in kvpress's ``alpha_safeguard``) keeps each
    head's top ``floor(alpha · k)`` first. See :func:`adaptive_select`.

    Heads then hold different numbers of entries: the cache stores ``K = max_h k_h`` slots per
    head and attention masks, per head, the slots a head does not hold. Such a cache is not
    evicted again (chunked prefill and decode eviction refuse it).

    The scores of different heads must be comparable: attention-based scorers (``snapkv``,
    ``h2o``, ``kvzip``, ``expected_attention``) are; key-norm and random scores are only
    roughly so.

    Attributes:
        scorer: the wrapped KV scorer, by name (its own budget is this method's ``ratio``).
        scorer_params: its other hyper-parameters, e.g. ``{"window": 32}``.
        alpha: fraction of the uniform per-head budget each head keeps by its own ranking.
    """

    name: ClassVar[str] = "adakv"
    ragged: ClassVar[bool] = True
    scorer: str = "snapkv"
    scorer_params: dict[str, Any] = field(default_factory=dict)
    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        kv = sorted(n for n, c in REGISTRY.items() if issubclass(c, KVMethod))
        cls = REGISTRY.get(self.scorer)
        # a class that is always ragged is a wrapper like this one (KVzip is ragged only
        # under its own global ranking, which adakv replaces)
        if cls is None or not issubclass(cls, KVMethod) or cls.ragged is True:
            choices = [n for n in kv if REGISTRY[n].ragged is not True]
            raise ValueError(f"adakv wraps a KV scorer; got scorer={self.scorer!r}, choose from "
                             f"{choices}")  # fmt: skip
        if cls.decode_evict:
            raise ValueError(f"{self.scorer} evicts while decoding, which a cache with per-head "
                             "budgets does not support; wrap another scorer")  # fmt: skip
        if not isinstance(self.scorer_params, dict):
            raise TypeError(f"scorer_params must be a dict, got {type(self.scorer_params)}")
        clash = {"ratio", "per_head"} & set(self.scorer_params)
        if clash:
            raise ValueError(f"scorer_params cannot set {sorted(clash)}: adakv sets them")
        self._inner = cls(ratio=self.ratio, **self.scorer_params)

    @property
    def scoring(self) -> KVMethod:
        return self._inner

    @property
    def reconstructs(self) -> bool:  # type: ignore[override]
        return self._inner.reconstructs

    def extra_forwards(self, n: int) -> int:
        return self._inner.extra_forwards(n)

    def score(self, ctx: KVContext) -> Tensor:
        return self._inner.score(ctx)

    def update_stats(self, ctx: KVContext) -> dict[str, Tensor]:
        return self._inner.update_stats(ctx)

    def must_keep(self, ctx: KVContext, keep: Tensor) -> Tensor | None:
        return self._inner.must_keep(ctx, keep)

    def select(
        self, ctx: KVContext, keep: Tensor, forced: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        own = self.must_keep(ctx, keep)
        if own is not None:
            forced = own if forced is None else forced | own
        scores = self.score(ctx)
        if not self.per_head:  # one ranking for all heads: the budget splits evenly
            scores = scores.mean(1, keepdim=True).expand_as(scores)
            if forced is not None:
                forced = forced.any(1, keepdim=True).expand_as(forced)
        return adaptive_select(scores, ctx.valid, keep, forced, self.alpha)
