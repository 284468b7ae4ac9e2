"""TOVA: keep the entries the current query attends to most, at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


@register
@dataclass
class TOVA(KVMethod):
    """TOVA (Oren et al., 2024): Token Omission Via Attention.

    "Transformers are Multi-State RNNs", arXiv:2401.06104.

    A decoder with a bounded cache is a multi-state RNN; TOVA's policy keeps the states the
    *current* query attends to most. With ``q_t`` the last real query of the forward and
    ``A_j = softmax_j(s q_t · k_j)`` per query head ``g`` over the stored entries::

        score_j = (1/H) Σ_g A_{g,j}

    one score for every head of the layer (the paper averages over all heads; ``per_head``
    has no effect). The prefill is cut to the layer's budget with the last prompt query;
    after that every decoding step evicts the lowest-scored entry (possibly the token just
    written), holding each layer at the size its prefill left (:attr:`decode_evict`).
    """

    name: ClassVar[str] = "tova"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    decode_evict: ClassVar[bool] = True
    per_head: bool = False

    def score(self, ctx: KVContext) -> Tensor:
        q, q_index, q_valid = ctx.queries(ctx.n_new)  # [B, H, n, d]; n = 1 when decoding
        b, h, _, d = q.shape
        ar = torch.arange(ctx.n_new, device=q_valid.device)
        last = torch.where(q_valid, ar, -1).amax(1).clamp_min(0)  # the last real query
        q = q.gather(2, last[:, None, None, None].expand(b, h, 1, d))
        a = torch.softmax(ctx._logits(q, q_index.gather(1, last[:, None])).float(), dim=-1)
        a = a.nan_to_num(0.0)[:, :, 0]  # [B, H, L]
        s = a.mean(1, keepdim=True)
        return s.expand(b, ctx.keys.shape[1], ctx.length)
