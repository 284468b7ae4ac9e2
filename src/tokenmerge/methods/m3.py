"""M3-style nested average pooling of the patch grid (Cai et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.budget import Budget, Constant, MaxR, PerLayer, as_budget, as_int
from ..core.flops import CostModel
from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, register


@dataclass(frozen=True)
class PoolAt(Budget):
    """M3's budget: pool ``side × side`` cells of the patch grid at one layer.

    The schedule holds ``side`` at that layer and 0 elsewhere (the value is a pooling side,
    not a token count; the token counts reached are recorded as usual). ``layer=None`` is the
    middle block, ``depth // 2``; negative layers count from the end.
    """

    side: int
    layer: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "side", as_int(self.side, "M3's pooling side r", minimum=0))
        if self.layer is not None:
            object.__setattr__(self, "layer", as_int(self.layer, "M3.layer", none_ok=True))

    @property
    def is_zero(self) -> bool:
        return self.side <= 1

    def validate(self, depth: int) -> None:
        self._layer(depth)

    def _layer(self, depth: int) -> int:
        layer = depth // 2 if self.layer is None else self.layer
        layer = layer + depth if layer < 0 else layer
        if not 0 <= layer < depth:
            raise ValueError(
                f"M3 layer={self.layer} is out of range for a model with {depth} patched "
                f"layers; choose a layer in [{-depth}, {depth - 1}]"
            )
        return layer

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        layer = self._layer(cost.depth)
        return [self.side if i == layer else 0 for i in range(cost.depth)]


@register
@dataclass
class M3(Method):
    """M3-style nested average pooling (Cai et al., "Matryoshka Multimodal Models",
    arXiv:2405.17430, 2024).

    M3 average-pools the ``h × w`` grid of visual tokens with ``avg_pool2d`` into nested
    scales (576 → 144 → 36 → 9 → 1 tokens for CLIP's 24 × 24 grid) and fine-tunes the LLM on
    all of them. The pooling is the training-free baseline kept here: after the attention of
    one encoder block (``layer``), the patch tokens are averaged in cells of ``r × r`` patches
    of the original grid, so ``r = 2`` keeps 1/4 of them, ``r = 4`` 1/16, ``r = 8`` 1/64::

        y_c = Σ_{i ∈ cell c} s_i x_i / Σ_{i ∈ cell c} s_i,   cell(i) = (⌊row_i / r⌋, ⌊col_i / r⌋)

    (size-weighted: equal to ``avg_pool2d`` when every size is 1). Grids that ``r`` does not
    divide get smaller cells at the bottom and right edges (``ceil_mode``). Rows and columns
    come from each token's original position (``state.pos``) and ``state.grid``; the
    protected prefix tokens (CLS, registers, distillation) are left untouched. Sizes are
    conserved and a constant input stays constant. No attention is needed.

    **Budget: the scale, not a token count.** ``r`` is the pooling side, an int (or a
    :class:`~tokenmerge.core.budget.Constant`), applied at ``layer``. A per-layer list gives
    the side at each layer instead (``[0, 0, 0, 2, 0, 0, 2, 0, ...]``: 1/4 after block 3, then
    1/16 after block 6); pooling again nests, each step pooling cells of the cumulative side
    ``Π r_l``. Other budget kinds (keep ratios, FLOPs targets) are refused.

    On DINOv2-S (257 tokens, 14 images, CLS-feature cosine to the unreduced model, mean / 5th
    percentile), ``r = 2`` after block 10, 8 and 4 (65 tokens left; analytic FLOPs 0.90, 0.77,
    0.52) gives .9858 / .9494, .9740 / .9384 and .9102 / .8192; ToMe at about the same FLOPs
    (r = 4, 8, 20 per layer) gives .9998 / .9990, .9993 / .9974 and .9832 / .9426. Pooling is
    a baseline, not a competitor.

    Attributes:
        layer: the block after whose attention the grid is pooled, for an int ``r``
            (negative counts from the end; ``None``, the default, is the middle block).
    """

    exact_counts: ClassVar[bool] = False  # r is the pooling side, not a token count
    name: ClassVar[str] = "m3"
    layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        b = as_budget(self.r)
        if not isinstance(b, (Constant, PerLayer, PoolAt)):
            raise ValueError(
                f"M3's budget is the pooling side, an int such as 2 (1/4 of the patch tokens) "
                f"or 4 (1/16), or a per-layer list of sides; got {b!r}. Choose the layer with "
                f"M3(layer=...)"
            )

    @classmethod
    def example(cls, r: int) -> M3:
        return cls(r=r, layer=1)

    @property
    def budget(self) -> Budget:
        b = as_budget(self.r)
        return PoolAt(b.r, self.layer) if isinstance(b, Constant) else b

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if isinstance(r, Tensor):
            if bool((r != r.flatten()[0]).any()):
                raise ValueError("M3 pools every sample of a batch with the same side")
            r = int(r.flatten()[0])
        if r <= 1:
            return None
        if state.grid is None:
            raise ValueError(
                "M3 pools the patch grid, but this model's tokens have no known grid "
                "(a non-square patch count, or a text model)"
            )
        side = state.cache.get("m3", 1) * r  # nested: cells of the cumulative side
        state.cache["m3"] = side
        b, n = state.pos.shape
        dev = state.pos.device
        h, w = state.grid
        patch = state.pos - state.n_prefix
        pooled = state.valid & ~state.protected & (patch >= 0)
        cols = -(-w // side)
        cell = (patch.div(w, rounding_mode="floor") // side) * cols + patch.remainder(w) // side
        n_cells = -(-h // side) * cols
        cell = torch.where(pooled, cell, n_cells)  # a spare cell for the others
        ar = torch.arange(n, device=dev).expand(b, n)
        rep = torch.full((b, n_cells + 1), n, dtype=torch.long, device=dev)
        rep.scatter_reduce_(1, cell, ar, reduce="amin")
        target = torch.where(pooled, rep.gather(1, cell), torch.where(state.valid, ar, -1))
        return Reduction.from_targets(target)
