"""PiToMe: energy-protected token merging (Tran et al., "Accelerating Transformers with
Spectrum-Preserving Token Merging", NeurIPS 2024, arXiv:2405.16148)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register, static_kept
from .matching import unit


def _cosine(metric: Tensor) -> Tensor:
    """``[B, N, N]`` cosine similarities, in at least float32 (energies sum over N terms)."""
    m = metric.to(torch.promote_types(metric.dtype, torch.float32))
    m = unit(m)
    return m @ m.transpose(1, 2)


def energy_scores(metric: Tensor, mergeable: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """PiToMe's energy score of every token, ``[B, N]`` (``-inf`` where not ``mergeable``).

    ``E_i = (1/|U|) Σ_{j∈U} f_m(cos(k_i, k_j))`` over the mergeable tokens ``U`` (``j = i``
    included; it adds the same ``f_m(1)/|U|`` to every token), with the ELU-shaped kernel
    ``f_m(x) = x - m`` for ``x ≥ m`` and ``α (exp(x - m) - 1)`` otherwise.
    """
    return _energy(_cosine(metric), mergeable, margin, alpha)


def _energy(cos: Tensor, mergeable: Tensor, margin: float, alpha: float) -> Tensor:
    shifted = cos - margin
    f = torch.where(shifted >= 0, shifted, alpha * torch.expm1(shifted))
    f = f.masked_fill(~mergeable[:, None, :], 0.0)
    count = mergeable.sum(-1, keepdim=True).clamp_min(1).to(f.dtype)
    return (f.sum(-1) / count).masked_fill(~mergeable, -torch.inf)


def pitome_targets(
    metric: Tensor, mergeable: Tensor, r: int | Tensor, margin: float, alpha: float = 1.0
) -> Tensor:
    """PiToMe's matching, as merge targets for :meth:`Reduction.from_targets`.

    The ``2r`` mergeable tokens with the highest energy are the merge candidates; ranked by
    energy (descending, ties by position), even ranks form set A and odd ranks set B. Every A
    token merges into its most similar B token (cosine; ties to the first B by position). The
    other tokens are kept. ``r`` is an int or a ``[B]`` tensor, clamped to half the mergeable
    tokens of each sample.
    """
    b, n, _ = metric.shape
    cos = _cosine(metric)
    energy = _energy(cos, mergeable, margin, alpha)
    order = energy.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(n, device=metric.device)
    rank = torch.empty_like(order).scatter_(1, order, ar.expand(b, n))
    r_t = torch.as_tensor(r, device=metric.device).reshape(-1, 1)
    r_t = torch.minimum(r_t, mergeable.sum(-1, keepdim=True) // 2)
    cand = rank < 2 * r_t  # the top 2r are mergeable tokens (energy -inf sorts last)
    is_a = cand & (rank % 2 == 0)
    is_b = cand & (rank % 2 == 1)
    dst = cos.masked_fill(~is_b[:, None, :], -torch.inf).argmax(-1)
    return torch.where(is_a, dst, ar.expand(b, n))


@register
@dataclass
class PiToMe(Method):
    """PiToMe: Protect Informative Tokens before Merging (Tran et al., NeurIPS 2024,
    arXiv:2405.16148).

    In every block, between attention and MLP, with keys averaged over heads as metric and
    ``W_ij = cos(k_i, k_j)`` over the mergeable tokens (protected tokens and padding excluded):

    1. energy score: ``E_i = (1/|U|) Σ_{j∈U} f_m(W_ij)`` over the mergeable tokens ``U``, with
       the margin kernel ``f_m(x) = x - m`` if ``x ≥ m`` else ``α (exp(x - m) - 1)`` (an ELU
       of ``x - m``: close neighbours add linearly, distant ones saturate at ``-α``);
    2. margin schedule over depth: ``m_l = m0 - m0 · l / L`` for block ``l`` of ``L`` (0-based);
    3. the ``2r`` tokens with the highest energy (members of large clusters) are merge
       candidates; the rest (isolated, informative tokens) are protected this layer;
    4. the candidates, ordered by energy, alternate into sets A and B; **every** A token merges
       into its most similar B token (``argmax_j W_ij``), size-weighted:
       ``x_j ← Σ s_i x_i / Σ s_i``; so exactly ``r`` tokens are removed.

    Unlike ToMe there is no top-r edge selection: the energy ranking picks the candidates.
    Attention is proportional (``+log s``) when the adapter's family uses it.

    Hyper-parameters: ``margin`` is ``m0``. The authors' patches use ``m0 = 0.75`` for their
    DeiT/MAE classifiers and ``m0 = 0.9`` for the "aug"/CLIP/BLIP models; we default to 0.9,
    the value of their retrieval and VLM experiments (the encoders this library targets). On
    DINOv2-S the two are within 0.012 of each other in mean CLS cosine at r = 8..16 (0.75
    ahead at r = 8 and 13, 0.9 ahead at r = 16; 24 photos, textiles and Fashion-MNIST
    images), and both stay below ToMe at the same r (0.953 vs 0.993 at r = 13).
    ``alpha = 1.0`` is the paper's α. The DeiT patch's ToMe-style first half (``pitome_bsm``)
    is not reproduced: every layer uses the energy rule. Cost: one ``N × N`` similarity per
    reducing layer (ToMe's is ``N/2 × N/2``). At most ``(N - protected) // 2`` tokens can be
    removed per layer.
    """

    name: ClassVar[str] = "pitome"
    margin: float = 0.9
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must lie in [-1, 1] (a cosine), got {self.margin}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    def max_r(self, n: int, n_protected: int) -> int:
        return max((n - n_protected) // 2, 0)

    def margin_at(self, layer: int, depth: int) -> float:
        """``m_l = m0 - m0 · l / L``."""
        return self.margin - self.margin * layer / depth

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        if state.depth is None:
            raise ValueError("PiToMe needs the model depth (TokenState.depth) for its margin")
        mergeable = state.valid & ~state.protected
        target = pitome_targets(
            sig.metric, mergeable, r, self.margin_at(layer, state.depth), self.alpha
        )
        # padding (size 0) is dropped: it carries no mass, and the batch stays compact
        target = target.masked_fill(~state.valid, -1)
        return Reduction.from_targets(target, kept=static_kept(state, r), selection=False)
