"""GTP: Graph-based Token Propagation (Xu et al., WACV 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register
from .matching import unit
from .pruning import attention, candidates, lowest

Graph = Literal["spatial", "semantic", "mixed"]


@register
@dataclass
class GTP(Method):
    """Graph-based Token Propagation (Xu et al., "GTP-ViT: Efficient Vision Transformers via
    Graph-based Token Propagation", WACV 2024, arXiv:2311.03035).

    **Graph**, built once per forward (at the first reducing layer) over the unprotected
    tokens and stored in ``state.cache``:

    - spatial: the 8-neighbourhood of each patch on the original grid (``state.grid``, from
      each token's original position ``state.pos``); models without a grid use the two
      sequence neighbours ``|i - j| = 1``;
    - semantic: ``j ∈ kNN(i)``, the ``neighbours`` most cosine-similar tokens of the hidden
      states (as in the official code the relation is directed: row ``i`` lists its own kNN);
    - ``mixed`` (the paper's best): ``G = G_spatial ∨ G_semantic``, no self loops;
    - ``Â = D^{-1/2} G D^{-1/2}`` with ``D = diag(G 1)``.

    The graph is indexed by original position, so at later layers it is read for the tokens
    still present: ``Â[K, K]`` after each step, never renormalised (the graph shrinks with the
    tokens). The official code builds it from the patch embeddings; here it is built from the
    hidden states where the first reduction happens (the input of block 0 is not exposed).

    **Selection**, in every block, from the attention probabilities ``A_h`` of that block:

    - regeneration difficulty ``γ_i = max_h A_h[i, i]``;
    - broadcasting ability ``ψ_i = max_h Σ_j A_h[j, i]`` (attention received, real queries);
    - the ``r`` unprotected tokens with the lowest ``γ_i ψ_i`` ("MixedAttnMax") form ``P``,
      the rest ``K``.

    **Propagation**: the tokens of ``P`` are removed after passing their features to their
    kept graph neighbours, and token sizes ("token scales", used by proportional attention)
    follow the same rule::

        X_K ← X_K + α Â[K, P] X_P,      s_K ← s_K + α Â[K, P] s_P

    As a :class:`Reduction` this is mode ``"sum"``: a kept token sends weight 1 to itself, a
    propagated token ``p`` sends ``α Â[k, p]`` to every kept neighbour ``k`` (as many columns
    as the largest such in-degree). A propagated token with no kept neighbour is dropped, as in
    the paper. Sizes are *not* conserved (``α < 1``), and a constant input does not stay
    constant: this is propagation, not averaging.

    **Cost**: the selection needs the full attention matrix, so every reducing layer computes
    an explicit ``softmax(QKᵀ)`` beside the model's fused attention (``O(N²)`` memory per head).
    The graph costs one ``N × N`` cosine per forward. On DINOv2-S (14 images, CLS-feature
    cosine to the unreduced model, mean / 5th percentile) GTP reaches .9949 / .9881 at r = 8
    and .9772 / .9493 at r = 16 (ToMe: .9993 / .9974 and .9929 / .9695).

    Attributes:
        alpha: propagation coefficient ``α`` (0.1, the official default).
        neighbours: ``k`` of the semantic kNN graph (8, the official default).
        graph: ``"mixed"`` (default), ``"spatial"`` or ``"semantic"``.
    """

    name: ClassVar[str] = "gtp"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    alpha: float = 0.1
    neighbours: int = 8
    graph: Graph = "mixed"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {self.neighbours}")

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        b, n = state.pos.shape
        attn = attention(sig, state)
        regen = attn.diagonal(dim1=-2, dim2=-1).amax(1)
        q = state.valid.to(attn.dtype)[:, None, None, :]
        broadcast = (q @ attn).squeeze(2).amax(1)  # Σ_j over the real queries j
        cand = candidates(state)
        prop = lowest(regen * broadcast, cand, r)
        kept = cand & ~prop
        # the propagated tokens first (in token order), as many rows as the largest budget
        n_prop = max(int(prop.sum(1).max()), 1)
        pidx = prop.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :n_prop]
        pok = prop.gather(1, pidx)
        # w[b, p, k] = Â[k, p] for propagated p (rows) and kept graph nodes k (columns)
        w = self.columns(sig, state, pidx)
        w = (w * (kept[:, :, None] & pok[:, None, :])).transpose(1, 2)
        cols = max(int((w > 0).sum(-1).max()), 1)
        val, idx = w.topk(cols, dim=-1)
        ar = torch.arange(n, device=w.device).expand(b, n)
        target = torch.full((b, n, cols), -1, dtype=torch.long, device=w.device)
        target[..., 0] = torch.where(state.valid, ar, -1)
        weight = torch.zeros(b, n, cols, dtype=w.dtype, device=w.device)
        weight[..., 0] = 1.0
        rows = pidx.unsqueeze(-1).expand(b, n_prop, cols)
        pm = pok.unsqueeze(-1)
        target.scatter_(
            1, rows, torch.where(pm, torch.where(val > 0, idx, -1), target.gather(1, rows))
        )
        weight.scatter_(1, rows, torch.where(pm, self.alpha * val, weight.gather(1, rows)))
        return Reduction.from_targets(target, weight, mode="sum")

    def columns(self, sig: Signals, state: TokenState, cols: Tensor) -> Tensor:
        """``Â[i, c]`` for every current token ``i`` and the current tokens ``cols``
        (``[B, M]``): ``[B, N, M]``, 0 outside the graph. Builds the graph on first use."""
        cached = state.cache.get("gtp")
        if cached is None:
            cached = state.cache["gtp"] = self._build(sig, state)
        a0, slot = cached
        rows = torch.where(candidates(state), slot.gather(1, state.pos), -1)
        b, n = rows.shape
        g, m = a0.shape[1], cols.shape[1]
        c = rows.gather(1, cols)
        a = a0.gather(2, c.clamp_min(0).unsqueeze(1).expand(b, g, m))
        a = a.gather(1, rows.clamp_min(0).unsqueeze(-1).expand(b, n, m))
        return a * ((rows >= 0)[:, :, None] & (c >= 0)[:, None, :]).to(a.dtype)

    def _build(self, sig: Signals, state: TokenState) -> tuple[Tensor, Tensor]:
        """The normalised graph over the tokens present now, and ``slot``: original position
        → row of the graph (``-1`` for tokens outside it)."""
        nodes = candidates(state)
        b, n = nodes.shape
        dev = nodes.device
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        g = torch.zeros(b, n, n, dtype=torch.bool, device=dev)
        if self.graph in ("spatial", "mixed"):
            g |= self._spatial(state)
        if self.graph in ("semantic", "mixed") and self.neighbours > 0:
            x = unit(sig.x)
            sim = (x @ x.transpose(1, 2)).masked_fill(~nodes[:, None, :] | eye, -torch.inf)
            k = min(self.neighbours, n - 1)
            if k > 0:
                val, idx = sim.topk(k, dim=-1)
                g.scatter_(2, idx, val > -torch.inf)
        g &= nodes[:, :, None] & nodes[:, None, :] & ~eye
        gf = g.to(sig.x.dtype)
        deg = gf.sum(-1)
        dinv = torch.where(deg > 0, deg.clamp_min(1).rsqrt(), 0.0)
        a0 = dinv[:, :, None] * gf * dinv[:, None, :]
        # non-graph tokens write into a spare column, so duplicate positions cannot collide
        slot = torch.full((b, state.n_orig + 1), -1, dtype=torch.long, device=dev)
        ar = torch.arange(n, device=dev).expand(b, n)
        slot.scatter_(1, torch.where(nodes, state.pos, state.n_orig), torch.where(nodes, ar, -1))
        return a0, slot[:, :-1]

    @staticmethod
    def _spatial(state: TokenState) -> Tensor:
        pos = state.pos
        if bool((pos == pos[:1]).all()):
            pos = pos[:1]  # the same tokens in every sample: one [1, N, N] graph, broadcast
        if state.grid is None:
            d = pos[:, :, None] - pos[:, None, :]
            return d.abs() == 1
        w = state.grid[1]
        patch = pos - state.n_prefix
        row, col = patch.div(w, rounding_mode="floor"), patch.remainder(w)
        dr = (row[:, :, None] - row[:, None, :]).abs()
        dc = (col[:, :, None] - col[:, None, :]).abs()
        return (dr <= 1) & (dc <= 1)
