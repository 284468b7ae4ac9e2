"""Plain downsampling of the visual-token grid (area interpolation), before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from .base import ProjectorMethod, VisualTokens
from .m3_proj import part_offsets


def _windows(pos: Tensor, size: Tensor, out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The adaptive-pooling windows along one axis that contain input index ``pos``.

    Window ``i`` of ``out`` over ``size`` inputs covers ``[⌊i·size/out⌋, ⌈(i+1)·size/out⌉)``.
    For ``out ≤ size`` an input lies in window ``i0 = ⌊pos·out/size⌋`` and at most one
    neighbour, so the candidates ``i0 - 1, i0, i0 + 1`` are checked. Returns ``[..., 3]``
    window indices, membership, window lengths and each window's centre input
    ``⌊(start + end - 1) / 2⌋`` (the lower one on a tie).
    """
    size_, out_ = size.clamp_min(1).unsqueeze(-1), out.clamp_min(1).unsqueeze(-1)
    i0 = (pos * out.clamp_min(1)) // size.clamp_min(1)
    i = i0.unsqueeze(-1) + torch.tensor([-1, 0, 1], device=pos.device)
    start = (i * size_).div(out_, rounding_mode="floor")
    end = -((-(i + 1) * size_).div(out_, rounding_mode="floor"))
    p = pos.unsqueeze(-1)
    member = (i >= 0) & (i < out_) & (start <= p) & (p < end)
    return i, member, end - start, (start + end - 1).div(2, rounding_mode="floor")


@register
@dataclass
class DownsampleProj(ProjectorMethod):
    """Plain downsampling of each image's visual-token grid: the baseline that VTC-Bench
    (arXiv:2510.07143: "simple image downsampling consistently outperforms many advanced
    compression methods") and UniPruneBench (arXiv:2511.02650) found hard to beat. There is no
    method paper; the operator is area interpolation of the projector's token grid.

    Each part's ``R × C`` grid (never mixing parts) is resized to ``R' × C'`` with
    ``R' = max(1, round(R·f))``, ``C' = max(1, round(C·f))``, ``f = sqrt(keep / m)`` (``m``
    reducible tokens of the image), by area interpolation, exactly
    ``torch.nn.functional.adaptive_avg_pool2d``::

        y_{ij} = mean_{r ∈ [a_i, b_i), c ∈ [a'_j, b'_j)} x_{rc},
        a_i = ⌊i·R/R'⌋,  b_i = ⌈(i+1)·R/R'⌉   (same for columns)

    For ratios that are not integers the windows overlap by one row or column, so an input
    feeds up to four outputs: T is many-to-many with weight ``1 / |window|`` (mode ``"sum"``;
    output sizes are 1).

    **Budget.** ``keep`` sets ``f``; the count reached is ``Σ R'·C'``, close to but not
    exactly ``keep`` (``exact_counts = False``). ``keep = m`` is the identity. Protected tokens
    (``image_newline``) are kept as they are.

    **Positions.** An output keeps the position of the input nearest its window's centre
    (``(⌊(a_i + b_i - 1)/2⌋, ⌊(a'_j + b'_j - 1)/2⌋)``; on a tie the lower index).
    """

    name: ClassVar[str] = "downsample_proj"
    exact_counts: ClassVar[bool] = False

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        u, n = v.valid.shape
        dev = v.x.device
        cand = v.candidates
        m = cand.sum(1)
        f = (keep.double() / m.clamp_min(1).double()).sqrt()  # [U]
        rows, cols = v.grid[..., 0].long(), v.grid[..., 1].long()  # [U, P]
        rows_o = torch.round(rows.double() * f[:, None]).long().clamp_min(1)
        cols_o = torch.round(cols.double() * f[:, None]).long().clamp_min(1)
        rows_o = torch.where(rows > 0, torch.minimum(rows_o, rows), 0)
        cols_o = torch.where(cols > 0, torch.minimum(cols_o, cols), 0)
        offset = part_offsets(rows_o * cols_o)
        part = v.part.clamp_min(0)
        r, c = v.coord[..., 0].clamp_min(0), v.coord[..., 1].clamp_min(0)
        g = lambda t: t.gather(1, part)  # noqa: E731  per-token value of a per-part tensor
        ri, rm, rl, rc = _windows(r, g(rows), g(rows_o))  # [U, n, 3]
        ci, cm, cl, cc = _windows(c, g(cols), g(cols_o))
        # the 3 x 3 combinations of a row window and a column window
        member = (rm[..., :, None] & cm[..., None, :]).flatten(2) & cand[..., None]
        at_r, at_c = rc == r[..., None], cc == c[..., None]  # the window's centre row / col
        is_rep = (at_r[..., :, None] & at_c[..., None, :]).flatten(2) & member
        cell = g(offset)[..., None, None] + ri[..., :, None] * g(cols_o)[..., None, None]
        cell = (cell + ci[..., None, :]).flatten(2)
        cell = torch.where(member, cell, n)  # a spare cell for non-members
        area = (rl[..., :, None] * cl[..., None, :]).flatten(2)
        ar = torch.arange(n, device=dev).expand(u, n)
        rep = torch.full((u, n + 1), -1, dtype=torch.long, device=dev)
        src = ar[..., None].expand(-1, -1, 9).flatten(1)
        rep.scatter_(1, torch.where(is_rep, cell, n).flatten(1), src)
        target = torch.where(member, rep.gather(1, cell.flatten(1)).view(u, n, 9), -1)
        weight = torch.where(member, 1.0 / area.clamp_min(1).float(), 0.0)
        # each token's own output (if it represents one) first, then its other windows
        rank = is_rep.long() * 2 + member.long()
        order = rank.argsort(dim=-1, descending=True, stable=True)[..., :4]
        target, weight = target.gather(-1, order), weight.gather(-1, order)
        other = torch.where(v.valid, ar, -1)  # protected tokens stay, padding goes
        target[..., 0] = torch.where(cand, target[..., 0], other)
        weight[..., 0] = torch.where(cand, weight[..., 0], 1.0)
        return Reduction.from_targets(target, weight, mode="sum")
