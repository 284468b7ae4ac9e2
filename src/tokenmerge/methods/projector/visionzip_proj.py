"""VisionZip on the projector output: dominant tokens by saliency plus contextual merges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from ..matching import unit
from .base import ProjectorMethod, VisualTokens, top_k


def compact(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The positions of each row's ``mask`` tokens, in token order, left-aligned: ``[U, W]``
    indices (``W`` = the largest count) and which of those slots hold one."""
    u, n = mask.shape
    ar = torch.arange(n, device=mask.device).expand(u, n)
    w = int(mask.sum(1).max()) if u and n else 0
    idx = torch.where(mask, ar, n + ar).argsort(dim=1)[:, :w]
    return idx, mask.gather(1, idx)


def nearest(x: Tensor, to: Tensor) -> Tensor:
    """``[U, n]``: for every token, the ``to`` token most cosine-similar to it (``x``; ties:
    the lower index). Rows without any ``to`` token get an arbitrary valid index."""
    idx, ok = compact(to)
    key = unit(x.float())
    sub = key.gather(1, idx.unsqueeze(-1).expand(-1, -1, key.shape[-1]))
    sim = (key @ sub.transpose(1, 2)).masked_fill(~ok[:, None, :], -torch.inf)
    if idx.shape[1] == 0:
        return torch.zeros(to.shape, dtype=torch.long, device=to.device)
    return idx.gather(1, sim.argmax(-1))


def contextual(x: Tensor, rest: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """VisionZip's contextual tokens among the ``rest`` tokens of each row.

    Of the ``M`` tokens of ``rest`` (in token order, ``j = 0 .. M-1``), the ``c[u]`` tokens with
    ``j % step == 0`` and ``j // step < c``, ``step = max(1, M // c)``, are *targets*; every
    other ``rest`` token joins the target most cosine-similar to it (``x``),
    ``t(i) = argmax_t cos(x_i, x_t)`` (ties: the lower index).

    Returns ``(ctx, assign)``: ``[U, n]`` bool targets and ``[U, n]`` long target of every token
    (meaningful on ``rest & ~ctx`` where ``c > 0``).
    """
    j = rest.long().cumsum(1) - 1
    m = rest.sum(1)
    step = (m // c.clamp_min(1)).clamp_min(1).unsqueeze(1)
    ctx = rest & (j % step == 0) & (j // step < c.unsqueeze(1))
    return ctx, nearest(x, ctx)


@register
@dataclass
class VisionZipProj(ProjectorMethod):
    """VisionZip (Yang, Chen, Tian, Wang, Li, Yu, Jia, "VisionZip: Longer is Better but Not
    Necessary in Vision Language Models", CVPR 2025, arXiv:2412.04467) on the visual tokens of a
    VLM, after its projector.

    Of the ``m`` reducible tokens of an image, ``keep = D + C`` stay:

    1. **dominant**: the ``D`` tokens with the largest vision-tower saliency ``a_i`` (the CLS
       token's attention to token ``i`` at the feature layer, averaged over heads; VisionZip
       sums over heads, which ranks the same);
    2. **contextual**: of the ``M = m - D`` remaining tokens (token order, ``j = 0 .. M-1``),
       the ``C`` tokens ``j = 0, s, 2s, ...`` with ``s = max(1, ⌊M / C⌋)`` are targets; every
       other remaining token ``i`` joins ``t(i) = argmax_t cos(x_i, x_t)`` (cosine of the
       projector outputs ``x``; VisionZip compares the vision tower's keys, which the projector
       site does not see);
    3. a target becomes the mean of itself and its members, ``y_t = (x_t + Σ_{t(i)=t} x_i) /
       (1 + |t|)`` (``merge="mean"``, the default), or VisionZip's own rule
       ``y_t = x_t + mean_{t(i)=t} x_i`` (``merge="add"``).

    **Budget.** ``C = round(keep · contextual_ratio)`` with VisionZip's split 54 + 10 (so
    ``contextual_ratio = 10/64``; 108 + 20 and 162 + 30 are the same ratio), at least 1 when
    ``keep ≥ 2``; ``D = keep - C``. VisionZip's 64 / 128 / 192 tokens of LLaVA-1.5's 576 are
    ``ratio = 1 - 64/576 ≈ 0.889``, ``0.778`` and ``0.667``. ``keep = m`` keeps every token
    unchanged. Protected tokens (LLaVA-NeXT's ``image_newline``) are kept as they are.

    **Positions.** Every output keeps the position of its representative: a dominant token its
    own, a contextual token the position of its target.

    Attributes:
        contextual_ratio: share of the kept tokens that are contextual (VisionZip: 10/64).
        merge: ``"mean"`` or ``"add"`` (VisionZip's ``x_t + mean``; mode ``"sum"``).
    """

    name: ClassVar[str] = "visionzip_proj"
    visual_needs: ClassVar[frozenset[str]] = frozenset({"saliency"})
    contextual_ratio: float = 10 / 64
    merge: Literal["mean", "add"] = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.contextual_ratio <= 1.0:
            raise ValueError(
                f"VisionZipProj.contextual_ratio must lie in [0, 1], got {self.contextual_ratio}"
            )

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        if v.saliency is None:
            raise ValueError("VisionZipProj needs the vision tower's saliency (v.saliency)")
        u, n = v.valid.shape
        cand = v.candidates
        keep = torch.minimum(keep, cand.sum(1))
        c = torch.round(keep.double() * self.contextual_ratio).long()
        c = torch.where(keep >= 2, c.clamp_min(1), c)
        c = torch.minimum(c, keep)
        dom = top_k(v.saliency, cand, keep - c)
        rest = cand & ~dom
        ctx, assign = contextual(v.x, rest, c)
        src = rest & ~ctx
        ar = torch.arange(n, device=v.x.device).expand(u, n)
        target = torch.where(v.valid, ar, -1)
        target = torch.where(src, torch.where(c[:, None] > 0, assign, -1), target)
        if self.merge == "mean":
            return Reduction.from_targets(target)
        src = src & (c[:, None] > 0)
        count = torch.zeros(u, n, dtype=torch.float32, device=v.x.device)
        count.scatter_add_(1, assign, src.float())
        weight = torch.where(src, 1.0 / count.gather(1, assign).clamp_min(1.0), 1.0)
        return Reduction.from_targets(target, weight, mode="sum")
