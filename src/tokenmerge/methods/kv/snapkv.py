"""SnapKV: pooled attention from an observation window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


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
