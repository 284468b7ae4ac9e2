"""Token Transforming: many-to-many token aggregation (Zeng et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register, static_kept
from .matching import unit
from .pruning import candidates, importance, lowest

Importance = Literal["cls", "keynorm", "tome"]
Weights = Literal["softmax", "cosine"]


@register
@dataclass
class TokenTransforming(Method):
    """Many-to-many Token Transforming (Zeng, Yu, Kong, Tang, "Token Transforming: A Unified
    and Training-Free Token Compression Framework for Vision Transformer Acceleration",
    arXiv:2506.05709, 2025).

    The paper writes every token reduction as ``Y = T X`` (``T ∈ R^{N'×N}``): pruning has
    one-hot rows, merging one-hot columns; Token Transforming lets every input token contribute
    to *several* outputs with soft weights, so nothing is discarded. Its code is not public;
    this is our design of that idea, one step per block between attention and MLP:

    1. **Targets.** Score the unprotected tokens by importance; the ``N_c - r`` most
       important stay (they are the outputs), the ``r`` least important become sources ``S``.
    2. **Soft assignment.** Each source ``i`` spreads over its ``k`` most similar targets
       ``N_k(i)`` (cosine of the keys averaged over heads, ToMe's metric), with weights
       normalised per source:

       - ``softmax``: ``w_ij = exp(c_ij/τ) / Σ_{l∈N_k(i)} exp(c_il/τ)``;
       - ``cosine``: ``w_ij = max(c_ij, 0) / Σ_l max(c_il, 0)`` (top-1 if all are ≤ 0).

       A target keeps all of itself (``w_jj = 1``).
    3. **Aggregation** (mode ``"mean"``, size-weighted)::

           y_j = (s_j x_j + Σ_{i∈S} w_ij s_i x_i) / (s_j + Σ_{i∈S} w_ij s_i),
           s'_j = s_j + Σ_{i∈S} w_ij s_i

       Since ``Σ_j w_ij = 1``, sizes are conserved, and a constant input stays constant.

    Importance (``importance``):

    - ``"cls"``: the CLS token's attention averaged over heads (one extra ``q_cls Kᵀ`` per
      layer; models without CLS use the attention received, a full ``QKᵀ``);
    - ``"keynorm"``: ``-mean_h ||k_h||`` (small keys attract attention, Devoto et al. 2024);
      no attention needed;
    - ``"tome"``: ``-max_{j≠i} c_ij``: the most redundant tokens become sources.

    The defaults were chosen by the cosine of the final CLS feature to that of the unreduced
    DINOv2-S (HF backend, 12 blocks, 257 tokens, proportional attention), on 14 images (the 6
    scikit-image photos, 4 textile photos, 4 Fashion-MNIST digits), at a constant r per layer
    (161, 101 and 65 tokens left after the last block). Mean / 5th percentile:

    ======================================  =============  =============  =============
    variant                                 r = 8          r = 13         r = 16
    ======================================  =============  =============  =============
    ToMe (for comparison)                   .9993 / .9974  .9950 / .9758  .9929 / .9695
    cls, k=2, τ=0.02, softmax (default)     .9933 / .9818  .9883 / .9721  .9868 / .9668
    cls, k=1                                .9940 / .9794  .9868 / .9641  .9851 / .9560
    cls, k=2, τ=0.1                         .9932 / .9811  .9878 / .9717  .9853 / .9643
    cls, k=4, τ=0.1                         .9936 / .9838  .9878 / .9701  .9836 / .9535
    cls, k=4, τ=0.02                        .9938 / .9836  .9887 / .9762  .9858 / .9632
    cls, k=4, τ=0.5                         .9937 / .9842  .9875 / .9683  .9830 / .9545
    cls, k=4, cosine weights                .9937 / .9846  .9875 / .9683  .9831 / .9547
    keynorm, k=4, τ=0.1                     .9655 / .9221  .9374 / .8658  .9209 / .8043
    tome, k=1                               .9989 / .9959  .9928 / .9692  .9895 / .9526
    tome, k=2, τ=0.02                       .9971 / .9880  .9883 / .9507  .9807 / .9253
    tome, k=4, τ=0.1                        .9969 / .9900  .9828 / .9398  .9750 / .9056
    ======================================  =============  =============  =============

    What it says: the importance score matters most (the key norm is a poor signal on
    DINOv2). With CLS attention, spreading over a few targets helps a little over ``k=1``
    only with a sharp temperature and hurts with a flat one. The redundancy score ("tome")
    wants ``k=1`` (prune-and-merge, no longer many-to-many): it then has the best mean at
    every budget and the best tail at r=8, while CLS attention with ``k=2`` has the best tail
    at r ≥ 13. The default keeps the many-to-many variant with the better tail under heavy
    budgets; ``importance="tome", k=1`` is the better choice for light ones. ToMe stays
    ahead at every budget, by less at r=16. 14 images is a small sample: differences in the
    third decimal are noise.

    Attributes:
        k: targets each source spreads over (1 = prune-and-merge into the nearest target).
        temperature: ``τ`` of the softmax weights, on cosine similarities.
        weights: ``"softmax"`` or ``"cosine"``.
        importance: ``"cls"``, ``"keynorm"`` or ``"tome"``.
    """

    name: ClassVar[str] = "token_transforming"
    # queries are captured for the "cls" importance; the other scores leave them unused
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    k: int = 2
    temperature: float = 0.02
    weights: Weights = "softmax"
    importance: Importance = "cls"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        b, n = state.pos.shape
        cand = candidates(state)
        m = unit(sig.metric)
        sim = m @ m.transpose(1, 2)
        if self.importance == "cls":
            score = importance(sig, state)
        elif self.importance == "keynorm":
            score = -sig.k.norm(dim=-1).mean(1)
        else:
            eye = torch.eye(n, dtype=torch.bool, device=sim.device)
            others = sim.masked_fill(~cand[:, None, :] | eye, -torch.inf)
            score = -others.amax(-1)
        src = lowest(score, cand, r)
        tgt = cand & ~src
        kk = min(self.k, n)
        # a stable sort, not topk: exact ties (repeated words' keys) go to the lower index
        # whatever the padded width, so a padded batch picks what each sequence alone does
        val, idx = sim.masked_fill(~tgt[:, None, :], -torch.inf).sort(
            dim=-1, descending=True, stable=True
        )
        val, idx = val[..., :kk], idx[..., :kk]
        real = val > -torch.inf
        if self.weights == "softmax":
            w = (val / self.temperature).softmax(-1)
        else:
            pos = val.clamp_min(0.0).masked_fill(~real, 0.0)
            top1 = torch.zeros_like(pos)
            top1[..., 0] = 1.0
            tot = pos.sum(-1, keepdim=True)
            w = torch.where(tot > 0, pos / tot.clamp_min(1e-12), top1)
        ar = torch.arange(n, device=sim.device).expand(b, n)
        target = torch.full((b, n, kk), -1, dtype=torch.long, device=sim.device)
        target[..., 0] = torch.where(state.valid, ar, -1)
        weight = torch.zeros(b, n, kk, dtype=w.dtype, device=w.device)
        weight[..., 0] = 1.0
        s = src.unsqueeze(-1)
        target = torch.where(s, torch.where(real, idx, -1), target)
        weight = torch.where(s, w, weight)
        kept = static_kept(state, r)
        return Reduction.from_targets(target, weight, mode="mean", kept=kept, selection=False)
