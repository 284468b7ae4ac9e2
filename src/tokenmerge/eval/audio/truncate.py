"""The baseline a Whisper user reaches for first: a shorter encoder context (whisper.cpp's
``audio_ctx``), which keeps the earliest frames and drops the rest of the 30 s window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core.reduction import Reduction
from ...core.state import Signals, TokenState
from ...methods.base import Method, has_work, static_kept
from ...methods.pruning import candidates, lowest, targets_from_drop


@dataclass
class Truncate(Method):
    """Keep the earliest frames: drop the ``r`` tokens of latest original position.

    ``drop = the r largest pos_i among the real, unprotected tokens``. With the whole budget at
    the first layer (``r=[N0 - keep, 0, ...]``) this is a shorter encoder context: every clip
    keeps its first ``keep`` tokens (``keep · 20 ms`` of audio), whatever it holds. It is a
    bench baseline, not a registered method: it knows nothing of the content and cuts speech
    that lasts longer than the context it keeps.
    """

    name: ClassVar[str] = "truncate"

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        drop = lowest(-state.pos.float(), candidates(state), r)  # latest first
        return Reduction.from_targets(
            targets_from_drop(drop, state.valid), kept=static_kept(state, r), selection=True
        )
