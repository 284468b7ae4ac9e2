"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register, static_kept
from .matching import bipartite_targets


@register
@dataclass
class ToMe(Method):
    """Token Merging by bipartite soft matching (Bolya et al., ICLR 2023, arXiv:2210.09461).

    In every block, between attention and MLP, with keys ``k`` averaged over heads as metric:

    1. split the tokens alternately into sets A and B;
    2. ``S_ij = cos(k_i, k_j)`` for ``i ∈ A``, ``j ∈ B``; each A token keeps its best edge
       ``j*(i) = argmax_j S_ij``;
    3. keep the ``r`` edges with the largest ``S_i,j*(i)`` and merge each such A token into
       its B token by a size-weighted average: ``x_j ← (Σ s_i x_i) / Σ s_i``, ``s_j ← Σ s_i``;
    4. attention in later layers is proportional: ``softmax(q kᵀ/√d + log s)``.

    Protected tokens (CLS, registers, distillation, special tokens) never merge. At most
    ``(N - protected) // 2`` tokens can be merged per layer. Unlike the reference code, merged
    tokens keep the order of their representatives, so prefix tokens stay in front.
    """

    name: ClassVar[str] = "tome"

    def max_r(self, n: int, n_protected: int) -> int:
        return max((n - n_protected) // 2, 0)

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        mergeable = state.valid & ~state.protected
        target = bipartite_targets(sig.metric, mergeable, r)
        return Reduction.from_targets(target, kept=static_kept(state, r), selection=False)
