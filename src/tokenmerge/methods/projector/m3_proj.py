"""M3's nested average pooling of the visual-token grid, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from .base import ProjectorMethod, VisualTokens


def _ceil_div(a: Tensor, b: Tensor) -> Tensor:
    return -(-a // b)


def part_offsets(cells: Tensor) -> Tensor:
    """``[U, P]`` index of each part's first cell when the cells of all parts are numbered one
    after the other (``cells``: ``[U, P]`` cells per part)."""
    return cells.cumsum(1) - cells


@register
@dataclass
class M3Proj(ProjectorMethod):
    """M3 / Matryoshka Multimodal Models (Cai, Yang, Gao, Lee, "Matryoshka Multimodal
    Models", ICLR 2025, arXiv:2405.17430): nested average pooling of the visual tokens.

    M3 average-pools the ``24 × 24`` grid of LLaVA's visual tokens with ``avg_pool2d`` and a
    window of side ``s ∈ {1, 2, 4, 8, 24}`` (576, 144, 36, 9, 1 tokens) and fine-tunes the LLM
    on all scales; the pooling alone is the training-free baseline here. Each part's grid
    (LLaVA-NeXT: the base image and the AnyRes tiles, never mixed) is cut into ``s × s`` cells
    (smaller cells at the bottom and right borders, ``ceil_mode``)::

        cell(i) = (part_i, ⌊row_i / s⌋, ⌊col_i / s⌋),   y_c = mean_{cell(i) = c} x_i

    **Budget.** ``s`` is the smallest admissible scale whose pooled count ``Σ_parts
    ⌈rows/s⌉·⌈cols/s⌉`` is at most ``keep`` (the largest one when none is): powers of two
    (``scales="pow2"``, M3's nested scales: 1, 2, 4, 8, ...) or any integer (``"any"``).
    ``ratio = 0.75`` therefore gives M3's 144 tokens of 576, ``0.9375`` its 36, ``0.984`` its
    9. The count is set by the grid, not exactly ``keep`` (``exact_counts = False``); ``s = 1``
    is the identity. Protected tokens (``image_newline``) are kept as they are.

    **Positions.** A pooled token keeps the position of its cell's first token in raster order
    (its top-left token).

    Attributes:
        scales: ``"pow2"`` (M3's nested scales) or ``"any"`` (every integer side).
    """

    name: ClassVar[str] = "m3_proj"
    exact_counts: ClassVar[bool] = False
    scales: Literal["pow2", "any"] = "pow2"

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        u, n = v.valid.shape
        dev = v.x.device
        rows, cols = v.grid[..., 0].long(), v.grid[..., 1].long()  # [U, P]
        top = max(int(v.grid.max()) if v.grid.numel() else 1, 1)
        if self.scales == "pow2":
            sides = [1 << i for i in range(top.bit_length() + 1)]
        else:
            sides = list(range(1, top + 1))
        s_all = torch.tensor(sides, device=dev)  # [S]
        counts = (_ceil_div(rows[:, :, None], s_all) * _ceil_div(cols[:, :, None], s_all)).sum(
            1
        )  # [U, S]
        ok = counts <= keep[:, None]
        first = ok.int().argmax(1)
        side = s_all[torch.where(ok.any(1), first, len(sides) - 1)]  # [U]
        cand = v.candidates
        part = v.part.clamp_min(0)
        r, c = v.coord[..., 0].clamp_min(0), v.coord[..., 1].clamp_min(0)
        s = side[:, None]
        pc = _ceil_div(cols, side[:, None])  # [U, P] pooled columns per part
        offset = part_offsets(_ceil_div(rows, side[:, None]) * pc)
        cell = offset.gather(1, part) + (r // s) * pc.gather(1, part) + c // s
        cell = torch.where(cand, cell, n)  # a spare cell for the others
        ar = torch.arange(n, device=dev).expand(u, n)
        # the cell's first token in raster order: smallest (row * cols + col, index)
        key = (r * cols.gather(1, part) + c) * n + ar
        first_tok = torch.full((u, n + 1), n * n * n + n, dtype=torch.long, device=dev)
        first_tok.scatter_reduce_(1, cell, torch.where(cand, key, n * n * n + n), "amin")
        rep = first_tok.gather(1, cell) % n
        target = torch.where(cand, rep, torch.where(v.valid, ar, -1))
        return Reduction.from_targets(target)
