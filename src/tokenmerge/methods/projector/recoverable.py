"""Recoverable Compression: saliency filtering, text-guided recovery, merged background."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from ..matching import unit
from .base import ProjectorMethod, VisualTokens, top_k
from .visionzip_proj import contextual


@register
@dataclass
class RecoverableCompression(ProjectorMethod):
    """Recoverable Compression (Chen, Xu, Zhang, Liu, Liu, Liu, "Recoverable Compression: A
    Multimodal Vision Token Recovery Mechanism Guided by Text Information", AAAI 2025,
    arXiv:2409.01179).

    A query-agnostic filter followed by a query-aware recovery, then the background merged:

    1. **visual filtering**: the ``K_v`` tokens with the largest vision-tower saliency ``a_i``
       (the CLS token's attention to token ``i``, i.e. its similarity to the class token);
    2. **text-guided recovery**: of the others, the ``K_t`` tokens most similar to the
       question, ``s_i = cos(x_i, t̄)`` with ``t̄`` the mean of the question's LLM input
       embeddings (``text_score="mean"``: one embedding of the question, as the paper's single
       text feature), or ``s_i = max_t cos(x_i, t_t)`` (``"max"``); images without question
       text fall back to the saliency;
    3. **secondary recovery**: the remaining tokens are clustered into ``K_m`` tokens and each
       cluster merged (mean) into one: ``K_m`` evenly spaced remaining tokens are the centres
       and every other token joins its most cosine-similar centre (one nearest-centre
       assignment, as VisionZip's contextual tokens);
    4. the kept tokens stay in their original order.

    **Budget (interpreted).** The paper picks ``K_v`` and ``K_t`` per image with a dynamic
    outlier filter (about 10 % of LLaVA-1.5's 576 tokens on average, ``ratio ≈ 0.9``); here
    the budget is fixed by ``ratio`` and split as ``K_m = round(keep · merge_share)`` (at least
    1 when ``keep ≥ 2``), ``K_t = round(keep · text_share)`` (at most ``keep - K_m - 1``),
    ``K_v = keep - K_t - K_m``. The defaults (``text_share = 0.25``, ``merge_share = 10/64``)
    are ours, not the paper's. Protected tokens are kept as they are.

    **Positions.** Filtered and recovered tokens keep their own positions; a merged cluster
    keeps the position of its centre.

    Attributes:
        text_share: share of the kept tokens recovered by their similarity to the question.
        merge_share: share of the kept tokens that are merged clusters of the rest.
        text_score: ``"mean"`` (cosine to the mean question embedding) or ``"max"`` (largest
            cosine to any question token).
    """

    name: ClassVar[str] = "recoverable"
    visual_needs: ClassVar[frozenset[str]] = frozenset({"saliency", "text"})
    text_share: float = 0.25
    merge_share: float = 10 / 64
    text_score: Literal["mean", "max"] = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("text_share", "merge_share"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"RecoverableCompression.{f} must lie in [0, 1]")
        if self.text_share + self.merge_share > 1.0:
            raise ValueError("RecoverableCompression: text_share + merge_share must be <= 1")

    def text_similarity(self, v: VisualTokens) -> Tensor:
        """``[U, n]`` the similarity of every visual token to its image's question (the
        saliency where an image has no question text)."""
        sal = v.saliency.float()
        if v.text is None or v.text.shape[1] == 0:
            return sal
        tv = (
            torch.ones(v.text.shape[:2], dtype=torch.bool, device=v.text.device)
            if v.text_valid is None
            else v.text_valid
        )
        x, t = unit(v.x.float()), v.text.float()
        if self.text_score == "mean":
            w = tv.float().unsqueeze(-1)
            mean = (t * w).sum(1) / w.sum(1).clamp_min(1.0)
            score = (x * unit(mean)[:, None, :]).sum(-1)
        else:
            cos = (x @ unit(t).transpose(1, 2)).masked_fill(~tv[:, None, :], -torch.inf)
            score = cos.amax(-1)
        return torch.where(tv.any(1, keepdim=True), score, sal)

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        if v.saliency is None:
            raise ValueError("RecoverableCompression needs the vision tower's saliency")
        u, n = v.valid.shape
        cand = v.candidates
        keep = torch.minimum(keep, cand.sum(1))
        k_m = torch.round(keep.double() * self.merge_share).long()
        k_m = torch.minimum(torch.where(keep >= 2, k_m.clamp_min(1), k_m), keep)
        k_t = torch.round(keep.double() * self.text_share).long()
        k_t = torch.minimum(k_t, (keep - k_m - 1).clamp_min(0))
        k_v = keep - k_t - k_m
        vis = top_k(v.saliency, cand, k_v)
        txt = top_k(self.text_similarity(v), cand & ~vis, k_t)
        rest = cand & ~vis & ~txt
        ctx, assign = contextual(v.x, rest, k_m)
        src = rest & ~ctx
        ar = torch.arange(n, device=v.x.device).expand(u, n)
        target = torch.where(v.valid, ar, -1)
        target = torch.where(src, torch.where(k_m[:, None] > 0, assign, -1), target)
        return Reduction.from_targets(target)
