"""DivPrune: max-min diversity selection of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from ..matching import unit
from .base import ProjectorMethod, VisualTokens, keep_targets


@register
@dataclass
class DivPrune(ProjectorMethod):
    """DivPrune (Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning
    for Large Multimodal Models", CVPR 2025, arXiv:2503.02175).

    DivPrune keeps the subset ``S`` of ``keep`` visual tokens that solves the Max-Min Diversity
    Problem, ``max_{|S| = keep} min_{i ≠ j ∈ S} d(x_i, x_j)`` with the cosine distance
    ``d(x_i, x_j) = 1 - cos(x_i, x_j)`` of the projector outputs, by the greedy algorithm:

    1. the first token is the most isolated one, ``argmax_i min_{j ≠ i} d(x_i, x_j)`` (the
       largest distance to its nearest other token: the first pick of the paper's code);
    2. then, until ``keep`` tokens are chosen, ``S ← S ∪ {argmax_{i ∉ S} min_{s ∈ S}
       d(x_i, x_s)}``.

    Ties go to the lower index. The loop runs over the ``keep`` steps, all images at once
    (each image stops at its own ``keep``). DivPrune's default keeps 9.8 % of LLaVA-1.5's
    tokens (``ratio = 0.902``). Protected tokens are kept as they are.

    **Positions.** A pruning: every kept token keeps its own position.
    """

    name: ClassVar[str] = "divprune"

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        u, n = v.valid.shape
        dev = v.x.device
        cand = v.candidates
        keep = torch.minimum(keep, cand.sum(1))
        key = unit(v.x.float())
        dist = 1.0 - key @ key.transpose(1, 2)  # [U, n, n]
        pair = cand[:, :, None] & cand[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=dev)
        nearest = dist.masked_fill(~pair, torch.inf).amin(-1)  # to the nearest other token
        chosen = torch.zeros(u, n, dtype=torch.bool, device=dev)
        score = nearest
        rows = torch.arange(u, device=dev)
        for step in range(int(keep.max()) if u else 0):
            free = cand & ~chosen
            pick = score.masked_fill(~free, -torch.inf).argmax(1)  # [U]
            on = step < keep
            chosen[rows[on], pick[on]] = True
            d_pick = dist.gather(2, pick[:, None, None].expand(-1, n, 1)).squeeze(-1)
            score = d_pick if step == 0 else torch.minimum(score, d_pick)
        return Reduction.from_targets(keep_targets(chosen | v.protected, v.valid))
