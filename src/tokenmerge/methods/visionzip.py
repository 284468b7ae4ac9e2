"""VisionZip-style dominant + contextual tokens (Yang et al., CVPR 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register, static_kept
from .matching import unit
from .pruning import candidates, importance, lowest, per_sample

Merge = Literal["mean", "add"]


@register
@dataclass
class VisionZip(Method):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
    Language Models", CVPR 2025, arXiv:2412.04467), as a per-layer step.

    VisionZip compresses the vision encoder's output once (at layer -2 of CLIP, before the
    LLM) into ``D`` *dominant* plus ``C`` *contextual* tokens (54 + 10, 108 + 20, 162 + 30):

    1. dominant: the ``D`` tokens with the largest CLS attention ``a_i = Σ_h A_h[cls, i]``
       (plus CLS itself);
    2. contextual: of the remaining ``M`` tokens, ``C`` evenly spaced ones (every
       ``⌊M/C⌋``-th, in token order) are targets; every other remaining token joins the
       target whose key is most cosine-similar, ``t(i) = argmax_t cos(k_i, k_t)``;
    3. each target becomes ``x_t + mean_{i: t(i)=t} x_i`` (``merge="add"``, VisionZip's rule)
       or the size-weighted mean of itself and its members (``merge="mean"``, the default:
       it keeps a ViT's hidden states in range, conserves sizes and suits proportional
       attention).

    **Mapping onto a per-layer budget.** At a layer with ``N_c`` unprotected tokens and budget
    ``r`` the step keeps ``N_c - r`` tokens, of which ``C = clamp(round((N_c - r) ·
    contextual_ratio), 1, N_c - r)`` are contextual (the ratio defaults to VisionZip's
    10 / 64) and the rest dominant; the ``r + C`` non-dominant tokens are folded into the
    ``C`` contextual ones. A constant ``r`` therefore runs VisionZip's selection at every
    layer; VisionZip's one-shot use is the per-layer list ``[0, ..., 0, R, 0]`` (all of the
    reduction at one layer). The CLS row of attention costs one extra ``q_cls Kᵀ`` per layer
    (models without CLS rank by attention received, a full ``QKᵀ``). On DINOv2-S (14 images,
    CLS-feature cosine to the unreduced model, mean / 5th percentile): .9950 / .9891 at r = 8
    and .9657 / .9243 at r = 16 per layer (ToMe: .9993 / .9974 and .9929 / .9695).

    Attributes:
        contextual_ratio: share of the kept unprotected tokens that are contextual.
        merge: ``"mean"`` (default) or ``"add"`` (VisionZip's ``x_t + mean``; mode ``"sum"``,
            sizes become ``s_t + mean s_i`` and are not conserved).
    """

    name: ClassVar[str] = "visionzip"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    contextual_ratio: float = 10 / 64
    merge: Merge = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.contextual_ratio <= 1.0:
            raise ValueError(f"contextual_ratio must lie in [0, 1], got {self.contextual_ratio}")

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        b, n = state.pos.shape
        dev = state.pos.device
        cand = candidates(state)
        n_c = cand.sum(1)
        r_t = torch.minimum(per_sample(r, b, dev), (n_c - 1).clamp_min(0))
        out = n_c - r_t
        c = torch.round(out.double() * self.contextual_ratio).long()
        c = torch.where(r_t > 0, torch.minimum(c.clamp_min(1), out), 0)
        dom = lowest(-importance(sig, state), cand, out - c)
        rest = cand & ~dom
        # contextual targets: every step-th token of the remainder, in token order
        j = rest.long().cumsum(1) - 1
        m = r_t + c
        step = (m // c.clamp_min(1)).clamp_min(1).unsqueeze(1)
        ctx = rest & (j % step == 0) & (j // step < c.unsqueeze(1))
        src = rest & ~ctx
        key = unit(sig.metric)
        sim = (key @ key.transpose(1, 2)).masked_fill(~ctx[:, None, :], -torch.inf)
        assign = sim.argmax(-1)
        ar = torch.arange(n, device=dev).expand(b, n)
        target = torch.where(src, assign, torch.where(state.valid, ar, -1))
        kept = static_kept(state, r)
        if self.merge == "mean":
            return Reduction.from_targets(target, kept=kept, selection=False)
        count = torch.zeros(b, n, dtype=sig.x.dtype, device=dev)
        count.scatter_add_(1, assign, src.to(count.dtype))
        weight = torch.where(src, 1.0 / count.gather(1, assign).clamp_min(1.0), 1.0)
        return Reduction.from_targets(target, weight, mode="sum", kept=kept, selection=False)
