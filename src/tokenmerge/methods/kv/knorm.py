"""Key norm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


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
