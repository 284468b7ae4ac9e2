"""KeyDiff: keep the keys least similar to the mean key direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


@register
@dataclass
class KeyDiff(KVMethod):
    """KeyDiff (Park et al., 2025): evict the keys most similar to the others.

    "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
    Resource-Constrained Environments", arXiv:2504.15364.

    Keys that point in a distinctive direction are the ones attention can single out, so
    KeyDiff keeps the keys least similar to the anchor, the mean key direction. Per sample and
    KV head, over the real entries ``j`` (the cache's post-RoPE keys)::

        a_h     = (1/n) Σ_j k_j / ||k_j||
        score_j = -cos(k_j, a_h) = -(k_j · a_h) / (||k_j|| ||a_h||)

    Needs no queries and no attention: as cheap as ``knorm``, and independent of any question.
    """

    name: ClassVar[str] = "keydiff"

    def score(self, ctx: KVContext) -> Tensor:
        k = F.normalize(ctx.keys.float(), dim=-1)  # [B, H_kv, L, d]
        w = ctx.valid[:, None, :, None].to(k.dtype)
        n = ctx.counts.clamp_min(1).to(k.dtype)[:, None, None]
        anchor = (k * w).sum(2) / n  # [B, H_kv, d], the mean over the real entries only
        return -(k @ F.normalize(anchor, dim=-1)[..., None]).squeeze(-1)
