"""FrameFusion: merge video tokens similar to the previous frame's, then prune by importance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import has_work, register
from .decoder import DecoderMethod
from .projector.base import top_k


def previous_in_cell(cell: Tensor, alive: Tensor) -> Tensor:
    """``[B, N]``: for every ``alive`` token with ``cell >= 0``, the nearest earlier alive token
    of the same cell (its position in the previous frame); ``-1`` when there is none."""
    b, n = cell.shape
    ar = torch.arange(n, device=cell.device).expand(b, n)
    key = torch.where(alive & (cell >= 0), cell * n + ar, -1)  # by cell, then by position
    order = key.argsort(dim=1, stable=True)
    k_sorted = key.gather(1, order)
    same = torch.zeros_like(alive)
    same[:, 1:] = (k_sorted[:, 1:] >= 0) & (k_sorted[:, 1:] // n == k_sorted[:, :-1] // n)
    prev_sorted = torch.where(same, order.roll(1, dims=1), -1)
    return torch.full_like(ar, -1).scatter(1, order, prev_sorted)


@register
@dataclass
class FrameFusion(DecoderMethod):
    """FrameFusion (Fu, Liu, Wang, Sun, Huang, Yan, Xiao, Zeng, Zhang, Wang, "FrameFusion:
    Combining Similarity and Importance for Video Token Reduction on Large Visual Language
    Models", ICCV 2025, arXiv:2501.01986), inside the LLM.

    **Merging** (at the input of layers ``0 .. K-1``): every video token ``i`` is compared with
    the token of the same position in the previous frame that is still there, ``p(i)``:
    ``s_i = cos(h_i, h_{p(i)})``. Tokens with ``s_i >= similarity`` merge into ``p(i)``; a
    run of them along one position merges into the first token of the run, whose new hidden
    state is the plain mean of the run (FrameFusion's ``(h_start + Σ members) / (count + 1)``).
    When more tokens pass the threshold than the budget still allows, only the most similar
    ones merge (FrameFusion's top-k), and the budget is then met.

    **Pruning** (at the input of layer ``K``): the remaining video tokens are ranked by the
    attention they receive at layer ``K-1``, averaged over heads and all queries
    (``mean_{h, q} A_{h, q, j}``), and the top ones are kept so that the video tokens number
    ``round(n (1 - ratio))``. Original positions are kept.

    **Budget and schedule.** FrameFusion sets its sparsity from a FLOPs ``cost`` and stops
    merging at the first layer where fewer than 10% of the tokens merged, then prunes at the
    next layer. Here the budget is the video tokens kept (``ratio``, as every method in the
    benchmark), the merging layers are ``0 .. K-1`` and the pruning layer is ``K`` (default
    2), fixed so that every sample of a batch follows one schedule; a merge layer removes at
    most the budget, pruning removes exactly what is left of it.

    Needs the video frame of every token: the VLM adapter with video clips (on images it
    merges nothing and prunes like FastV with all queries).
    """

    name: ClassVar[str] = "framefusion"
    query: ClassVar[str] = "all"
    needs_frames: ClassVar[bool] = True
    similarity: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.similarity <= 1.0:
            raise ValueError(
                f"FrameFusion.similarity is a cosine threshold in [-1, 1], got {self.similarity}"
            )

    def schedule(self, depth: int) -> list[tuple[int, float]]:
        super().schedule(depth)  # validates the layer
        return [(layer, 1.0 - self.ratio) for layer in range(self.layer + 1)]

    def scored(self, layer: int) -> bool:
        return layer == self.layer

    def exact(self, layer: int) -> bool:
        return layer == self.layer

    def importance(self, sig: Signals, state: TokenState) -> Tensor:
        """Attention received at layer ``K-1``, averaged over heads and the real queries."""
        attn = sig.attn.nan_to_num(0.0).mean(1)  # [B, N, N]; padding rows may be all -inf
        real = state.valid.to(attn.dtype)
        return (attn * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if layer == self.layer:
            return super().reduce(sig, state, r, layer)
        if not has_work(r) or sig.cell is None:
            return None
        b, n, _ = sig.x.shape
        r = torch.as_tensor(r, device=sig.x.device).expand(b)
        span = state.valid & ~state.protected
        prev = previous_in_cell(sig.cell, span)
        h = torch.nn.functional.normalize(sig.x.float(), dim=-1)
        ok = prev >= 0
        other = h.gather(1, prev.clamp_min(0)[..., None].expand_as(h))
        sim = torch.where(ok, (h * other).sum(-1), -math.inf)
        # the most similar of those above the threshold, at most r of them
        merge = top_k(sim, ok & (sim >= self.similarity), r)
        ar = torch.arange(n, device=sig.x.device).expand(b, n)
        root = torch.where(merge, prev, ar)
        for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):  # follow runs to their start
            root = root.gather(1, root)
        target = torch.where(state.valid, root, -1)
        return Reduction.from_targets(target, mode="mean")
