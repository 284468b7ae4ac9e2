"""DART: keep the visual tokens least duplicated with a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from ..matching import unit
from .base import ProjectorMethod, VisualTokens, keep_targets, top_k


@register
@dataclass
class DART(ProjectorMethod):
    """DART (Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang, "Stop Looking for Important Tokens in
    Multimodal Language Models: Duplication Matters More", arXiv:2502.11494, 2025), on the
    visual tokens before the LLM.

    DART prunes by *duplication* instead of importance:

    1. **pivots**: the ``P`` tokens with the largest norm, ``P = argtopk_i ‖x_i‖₁`` (DART's
       default pivot rule is the L1 norm of the keys at the pruning layer; before the
       LLM the projector outputs ``x`` take their place);
    2. **duplication** of token ``i`` with pivot ``p``: ``dup(p, i) = cos(x_p, x_i)``;
    3. **retention** per pivot (``assign="groups"``, DART's rule): the pivots take turns in
       decreasing norm; pivot ``p_j`` keeps the ``q_j`` not yet kept non-pivot tokens least
       duplicated with it, ``argtopk_i -dup(p_j, i)``. The kept set is the pivots plus these
       groups. ``assign="max"`` keeps instead the tokens whose largest duplication with any
       pivot, ``max_p dup(p, i)``, is smallest.

    **Budget.** DART uses 8 pivots for LLaVA-1.5's 576 visual tokens; here
    ``P = clamp(round(pivots · m / 576), 1, keep)`` pivots for ``m`` reducible tokens (no text
    pivots: the projector site runs before the LLM). The ``keep - P`` other kept tokens are
    shared out evenly, ``q_j = ⌊(keep - P) / P⌋`` plus one for the first ``(keep - P) mod P``
    pivots, so that exactly ``keep`` tokens stay (our exact split of DART's per-pivot budget).
    DART's 128 / 64 tokens of 576 are ``ratio = 0.778`` / ``0.889``. Protected tokens are
    kept as they are.

    **Positions.** A pruning: every kept token keeps its own position.

    Attributes:
        pivots: pivot tokens per 576 reducible tokens (DART: 8).
        assign: ``"groups"`` (DART's per-pivot retention) or ``"max"``.
    """

    name: ClassVar[str] = "dart"
    pivots: int = 8
    assign: Literal["groups", "max"] = "groups"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pivots < 1:
            raise ValueError(f"DART.pivots must be >= 1, got {self.pivots}")

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        u = v.valid.shape[0]
        cand = v.candidates
        m = cand.sum(1)
        keep = torch.minimum(keep, m)
        p = torch.round(m.double() * self.pivots / 576).long().clamp_min(1)
        p = torch.minimum(p, keep)
        x = v.x.float()
        norm = x.abs().sum(-1)  # DART ranks pivots by the L1 norm
        kept = top_k(norm, cand, p)
        key = unit(x)
        rest = cand & ~kept
        if self.assign == "max":
            sim = (key @ key.transpose(1, 2)).masked_fill(~kept[:, None, :], -torch.inf)
            kept = kept | top_k(-sim.amax(-1), rest, keep - p)
            return Reduction.from_targets(keep_targets(kept | v.protected, v.valid))
        order = norm.masked_fill(~cand, -torch.inf).argsort(dim=1, descending=True, stable=True)
        share, extra = (keep - p) // p.clamp_min(1), (keep - p) % p.clamp_min(1)
        for j in range(int(p.max()) if u else 0):
            piv = key.gather(1, order[:, j, None, None].expand(-1, 1, key.shape[-1]))
            dup = (key @ piv.transpose(1, 2)).squeeze(-1)  # [U, n]
            q = torch.where(j < p, share + (j < extra).long(), 0)
            got = top_k(-dup, rest, q)
            kept, rest = kept | got, rest & ~got
        return Reduction.from_targets(keep_targets(kept | v.protected, v.valid))
