"""Random pruning of the visual tokens: the baseline every scoring rule has to beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from .base import ProjectorMethod, VisualTokens, keep_targets

_POS = (1 << 63) - 1  # a seed's bits that fit a non-negative int64


def _signed(c: int) -> int:
    """A 64-bit constant as the signed int64 that holds the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014) on int64 tensors (wrapping
    arithmetic): a fixed, well-mixed bijection of 64-bit counters, the same on every device."""
    x = x * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


@register
@dataclass
class RandomProj(ProjectorMethod):
    """Uniform random pruning of the visual tokens: each image keeps ``keep`` of its ``m``
    reducible tokens, a subset drawn uniformly at random. UniPruneBench (arXiv:2511.02650)
    finds it hard to beat; every projector method should be compared with it.

    **The draw.** Token ``j`` (the ``j``-th reducible token of its image, in token order) gets
    the 64-bit key ``h_j = mix64(mix64(mix64(seed) + m) + j)`` (SplitMix64's finaliser, a
    counter-based generator), and the ``keep`` tokens with the smallest keys stay: a uniformly
    random subset. ``seed`` is one draw from ``v.generator`` when the adapter supplies one
    (seeded per forward), else the method's ``seed`` field. A row's subset therefore depends
    only on the seed and on its own count ``m`` — never on the other images of the batch, the
    padding or the device — and two images with the same ``m`` keep the same token indices in
    one forward (change ``seed`` for another draw). Protected tokens are kept as they are.

    **Positions.** A pruning: every kept token keeps its own position.

    Attributes:
        seed: seed of the draws when no generator is supplied.
    """

    name: ClassVar[str] = "random_proj"
    seed: int = 0

    def row_seed(self, v: VisualTokens) -> int:
        if v.generator is None:
            return self.seed
        dev = v.generator.device
        return int(torch.randint(0, 1 << 62, (1,), generator=v.generator, device=dev))

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        cand = v.candidates
        m = cand.sum(1, keepdim=True)
        j = cand.long().cumsum(1) - 1
        base = mix64(torch.tensor(self.row_seed(v) & _POS, device=cand.device))
        key = mix64(mix64(base + m) + j)
        key = key.masked_fill(~cand, torch.iinfo(torch.long).max)
        order = key.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(key.shape[1], device=key.device).expand_as(order)
        )
        kept = (rank < keep[:, None]) & cand
        return Reduction.from_targets(keep_targets(kept | v.protected, v.valid))
