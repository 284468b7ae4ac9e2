"""H2O: accumulated attention (heavy hitters) plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


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
