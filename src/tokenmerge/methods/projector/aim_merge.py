"""AIM's pre-LLM iterative bipartite merging of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from ..matching import unit
from .base import ProjectorMethod, VisualTokens, top_k
from .visionzip_proj import compact


def bipartite_step(feat: Tensor, alive: Tensor, r: Tensor, group: Tensor | None = None) -> Tensor:
    """One bipartite merge of the ``alive`` tokens: the ``j``-th alive token (token order) is in
    A when ``j`` is even, in B when odd; each A token's best edge is its most cosine-similar B
    token, and the ``r[u]`` strongest edges (ties: the lower index) merge A into B. With
    ``group`` (``[U, n]`` long), edges join only tokens of the same group, and an A token with
    no B token in its group does not merge. Returns ``[U, n]`` targets (``t[i] = i`` for
    tokens that stay)."""
    u, n, _ = feat.shape
    rank = alive.long().cumsum(1) - 1
    in_a, in_b = alive & (rank % 2 == 0), alive & (rank % 2 == 1)
    a, a_ok = compact(in_a)
    b, b_ok = compact(in_b)
    key = unit(feat)
    d = key.shape[-1]
    ka = key.gather(1, a.unsqueeze(-1).expand(-1, -1, d))
    kb = key.gather(1, b.unsqueeze(-1).expand(-1, -1, d))
    ok = a_ok[:, :, None] & b_ok[:, None, :]
    if group is not None:
        ok = ok & (group.gather(1, a)[:, :, None] == group.gather(1, b)[:, None, :])
    sim = (ka @ kb.transpose(1, 2)).masked_fill(~ok, -torch.inf)
    best, dest = sim.amax(-1), b.gather(1, sim.argmax(-1))
    merge = top_k(best, ok.any(-1), r)
    ar = torch.arange(n, device=feat.device).expand(u, n)
    return ar.scatter(1, a, torch.where(merge, dest, a))


def group_means(x: Tensor, group: Tensor, member: Tensor) -> Tensor:
    """``[U, n, C]``: at each group's representative, the mean of the ``x`` of its members
    (``group[u, i]``: the representative of token ``i``; only ``member`` tokens count)."""
    u, n, d = x.shape
    idx = torch.where(member, group, 0).unsqueeze(-1).expand(-1, -1, d)
    w = member.to(x.dtype).unsqueeze(-1)
    num = x.new_zeros(u, n, d).scatter_add_(1, idx, x * w)
    den = x.new_zeros(u, n, 1).scatter_add_(1, idx[..., :1], w)
    return num / den.clamp_min(1.0)


@register
@dataclass
class AIMMerge(ProjectorMethod):
    """AIM's pre-LLM token merging (Zhong, Liu, Li, Wang, "AIM: Adaptive Inference of
    Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025, arXiv:2412.03248), per image.

    AIM runs ToMe's bipartite soft matching on the projected visual embeddings (they serve as
    both metric and values), one image (video frame) at a time, repeatedly: its default keeps
    50 % and then 25 % of the tokens (``r = N//2``, then ``r = N//4``). One iteration, on the
    ``m'`` tokens still there:

    1. split them alternately, in token order, into A (the 1st, 3rd, ... token) and B (AIM's
       ``a = x[..., ::2, :]``, ``b = x[..., 1::2, :]``);
    2. every ``a ∈ A`` draws an edge to ``b(a) = argmax_{b ∈ B} cos(x̄_a, x̄_b)``;
    3. the ``r = min(m' - keep, ⌊m'/2⌋)`` strongest edges merge their A token into its B token.

    ``x̄`` is a merged token's feature, the size-weighted mean of the original tokens it holds
    (``x̄_g = Σ_{i ∈ g} x_i / |g|``), and so is the output. Iterations repeat until ``keep``
    tokens remain, so ``ratio = 0.75`` reproduces AIM's default (50 % then 25 %); other
    ratios halve as long as that stays above ``keep`` and finish with one smaller step.

    **Interpretation.** AIM's code concatenates ``[unmerged A; B]`` after each step without
    re-sorting (a sort is commented out), so its second split alternates over that unsorted
    order; here the survivors stay in token order and the split alternates over them. Ties
    between edges go to the lower index.
    Protected tokens are kept as they are.

    **Positions.** A merged token keeps the position of its B token (its representative: the
    token that survived every iteration).
    """

    name: ClassVar[str] = "aim_merge"

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        u, n = v.valid.shape
        dev = v.x.device
        cand = v.candidates
        x = v.x.float()
        ar = torch.arange(n, device=dev).expand(u, n)
        group = ar.clone()  # representative of every original token
        alive = cand.clone()
        while True:
            cur = alive.sum(1)
            excess = cur - keep
            if not bool((excess > 0).any()):
                break
            r = torch.minimum(excess, cur // 2).clamp_min(0)
            t = bipartite_step(group_means(x, group, cand), alive, r)
            alive = alive & (t == ar)
            group = t.gather(1, group)
        target = torch.where(cand, group, torch.where(v.valid, ar, -1))
        return Reduction.from_targets(target)
