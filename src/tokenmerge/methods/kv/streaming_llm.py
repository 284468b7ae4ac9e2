"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


@register
@dataclass
class StreamingLLM(KVMethod):
    """StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus the most recent tokens.

    "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.

    Keep the first ``sinks`` tokens of each sequence (the attention sinks) and the most recent
    ones: with ``p_j`` the position of entry ``j`` in its own sequence,
    ``score_j = +inf if p_j < sinks else p_j``. Positions are the original ones (no key
    re-rotation: kept keys keep the RoPE phase they were written with).
    """

    name: ClassVar[str] = "streaming_llm"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, ctx: KVContext) -> Tensor:
        p = ctx.position.float()
        return p.masked_fill(ctx.position < self.sinks, math.inf)
