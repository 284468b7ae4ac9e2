"""Analytic FLOPs of a transformer encoder under token reduction.

One layer with ``n`` tokens entering attention and ``m`` tokens entering the MLP costs
(multiply-adds counted as 2 FLOPs, width ``C``, attention width ``A``, MLP width ``F``)::

    qkv + out projection   2 * n * C * 3A  +  2 * n * A * C
    QK^T and attn @ V      2 * 2 * n^2 * A
    MLP                    2 * m * C * F * n_mats     (n_mats = 2, or 3 for SwiGLU)

The reduction step sits between attention and MLP (ToMe's site), so a layer that removes
``r`` tokens has ``m = n - r`` and passes ``n - r`` tokens to the next layer. Norms,
activations and the matching itself are left out: they are a few percent and method-specific.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    """Shape of the encoder whose FLOPs are counted."""

    depth: int
    dim: int
    mlp_dim: int
    attn_dim: int | None = None
    mlp_mats: int = 2

    def layer_flops(self, n_attn: float, n_mlp: float) -> float:
        """FLOPs of one layer with ``n_attn`` tokens in attention and ``n_mlp`` in the MLP."""
        c, a, f = self.dim, self.attn_dim or self.dim, self.mlp_dim
        attn = 2 * n_attn * c * 3 * a + 2 * n_attn * a * c + 4 * n_attn * n_attn * a
        return attn + 2 * n_mlp * c * f * self.mlp_mats

    def tokens(self, n0: int, removed: Sequence[int]) -> list[int]:
        """Tokens left after each layer, for a schedule of ``removed`` tokens per layer."""
        out, n = [], n0
        for r in removed:
            n -= r
            out.append(n)
        return out

    def flops(self, n0: float, after: Sequence[float]) -> float:
        """Total FLOPs given the token count ``after`` each layer (length ``depth``)."""
        if len(after) != self.depth:
            raise ValueError(f"expected {self.depth} per-layer token counts, got {len(after)}")
        total, n = 0.0, n0
        for m in after:
            total += self.layer_flops(n, m)
            n = m
        return total

    def ratio(self, n0: float, after: Sequence[float]) -> float:
        """FLOPs relative to the unreduced encoder (1.0 = no saving)."""
        return self.flops(n0, after) / self.flops(n0, [n0] * self.depth)
