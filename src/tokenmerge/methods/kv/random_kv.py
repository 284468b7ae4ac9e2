"""Random KV eviction, reproducible per position (the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


def position_hash(seed: int, layer: int, head: Tensor, position: Tensor) -> Tensor:
    """Uniform pseudo-random numbers in [0, 1) from integers, identical on any batch.

    A 32-bit integer hash (two rounds of multiply-xorshift) of
    ``position ⊕ f(seed, layer, head)``, in int64 arithmetic that never overflows.
    """
    m = 0xFFFFFFFF
    x = (position.long() * 0x9E3779B1 + head.long() * 0x85EBCA77) & m
    x = x ^ ((seed * 0xC2B2AE3D + layer * 0x27D4EB2F + 0x165667B1) & m)
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & m
    x = (x >> 16) ^ x
    return x.double() / float(m + 1)


@register
@dataclass
class RandomKV(KVMethod):
    """Random KV eviction: the baseline every scorer must beat (kvpress's RandomPress).

    ``score_j = h(seed, layer, head, p_j)``: a hash of the entry's position in its own
    sequence, so the choice is random but reproducible and independent of batch neighbours.
    """

    name: ClassVar[str] = "random_kv"
    seed: int = 0

    def score(self, ctx: KVContext) -> Tensor:
        head = torch.arange(ctx.index.shape[1], device=ctx.index.device)[None, :, None]
        return position_hash(self.seed, ctx.layer, head, ctx.position).float()
