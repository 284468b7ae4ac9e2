"""ToFu: Token Fusion (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and
Token Merging", WACV 2024, arXiv:2312.01026)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register, static_kept
from .matching import bipartite_targets


@register
@dataclass
class ToFu(Method):
    """Token Fusion: prune where the model is non-linear, merge with MLERP where it is close
    to linear (Kim et al., WACV 2024, arXiv:2312.01026).

    Every block runs ToMe's bipartite soft matching on the keys (A = even, B = odd positions;
    each A token's best edge ``j*(i) = argmax_j cos(k_i, k_j)``; the ``r`` strongest edges are
    kept). What a kept edge does depends on the block:

    - blocks ``l < merge_from`` (early, non-linear: averaging two tokens there gives an input
      the block responds to very differently): **prune**, the A token is dropped and its B
      token is kept unchanged (sizes are not transferred);
    - blocks ``l ≥ merge_from``: **merge with MLERP**, the norm-preserving multi-token
      interpolation ``x̄ = Σ s_i x_i / Σ s_i`` (size-weighted average of the B token and the A
      tokens sent to it), rescaled to the largest input norm:
      ``MLERP(x_1..x_k) = x̄ · max_i ‖x_i‖ / ‖x̄‖``. A plain average shrinks the norm of
      dissimilar tokens, a distribution shift that MLERP (like SLERP for two vectors) avoids.

    ``merge_from`` is the switch layer. The paper picks it from a linearity probe of each
    block; the public re-implementations (PiToMe's ``algo/tofu`` and OpenToMe) prune in blocks
    ``0 .. L // 2`` and merge after, which is our default (``None`` → ``L // 2 + 1``: blocks
    0-6 prune, 7-11 merge on a 12-block ViT). ``merge_from=0`` is MLERP everywhere; any value
    ``≥ L`` is pruning everywhere. Protected tokens and padding are never matched; padding is
    dropped. At most ``(N - protected) // 2`` tokens can be removed per layer.
    """

    name: ClassVar[str] = "tofu"
    merge_from: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_from is not None and self.merge_from < 0:
            raise ValueError(f"merge_from must be >= 0 or None, got {self.merge_from}")

    def max_r(self, n: int, n_protected: int) -> int:
        return max((n - n_protected) // 2, 0)

    def switch(self, depth: int | None) -> int:
        """The first block that merges (the earlier ones prune)."""
        if self.merge_from is not None:
            return self.merge_from
        if depth is None:
            raise ValueError("ToFu needs the model depth (TokenState.depth) for its switch layer")
        return depth // 2 + 1

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        valid = state.valid
        target = bipartite_targets(sig.metric, valid & ~state.protected, r)
        target = target.masked_fill(~valid, -1)
        if layer < self.switch(state.depth):
            ar = torch.arange(target.shape[1], device=target.device)
            prune = torch.where(target == ar, target, -1)
            return Reduction.from_targets(prune, kept=static_kept(state, r), selection=True)
        return Reduction.from_targets(
            target, mode="mlerp", kept=static_kept(state, r), selection=False
        )
