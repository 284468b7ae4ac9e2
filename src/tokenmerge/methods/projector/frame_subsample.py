"""Uniform frame subsampling of a video clip's visual tokens, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from .base import ProjectorMethod, VisualTokens, keep_targets


def kept_frames(frames: Tensor, keep: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """``(K, chosen)``: frames kept per clip, ``K = clamp(round(F·keep/m), 1, F)``, and
    ``chosen[u, f]`` whether frame ``f`` is one of the ``K`` evenly spaced frames
    ``⌊(2i + 1)·F / (2K)⌋``, ``i = 0 … K-1`` (the centres of ``K`` equal segments)."""
    f = frames.clamp_min(1)
    k = torch.round(f.double() * keep.double() / m.clamp_min(1).double()).long()
    k = torch.minimum(k.clamp_min(1), f)
    top = int(f.max())
    i = torch.arange(top, device=frames.device).expand(len(f), top)
    at = ((2 * i + 1) * f[:, None]).div(2 * k[:, None], rounding_mode="floor")
    chosen = torch.zeros(len(f), top + 1, dtype=torch.bool, device=frames.device)
    chosen.scatter_(1, torch.where(i < k[:, None], at, top), True)
    return k, chosen[:, :top]


@register
@dataclass
class FrameSubsample(ProjectorMethod):
    """Uniform frame subsampling: each video clip keeps every token of ``K`` evenly spaced
    frames and drops the other frames whole. The baseline that every video method must beat
    (sampling fewer frames is what video LLMs do by default); there is no method paper.

    For a clip of ``F`` frames with ``m`` reducible tokens and a budget of ``keep``::

        K = clamp(round(F · keep / m), 1, F),   kept frames ⌊(2i + 1)·F / (2K)⌋, i < K

    i.e. the middle frame of each of ``K`` equal segments. The count reached is whole frames'
    (``exact_counts = False``). Video clips only (``VisualTokens.frames > 1``): an image is
    refused, since it has no frame to drop. Protected tokens (OneVision's trailing newline) are
    kept.

    **Positions.** A pruning: every kept token keeps its own position (its frame's temporal
    position under M-RoPE), so the gaps between kept frames stay visible to the LLM.
    """

    name: ClassVar[str] = "frame_subsample"
    exact_counts: ClassVar[bool] = False
    video_only: ClassVar[bool] = True

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        if v.frames is None:
            raise ValueError(f"{self.name} reduces video clips; these visual tokens are images")
        cand = v.candidates
        _, chosen = kept_frames(v.frames, keep, cand.sum(1))
        kept = chosen.gather(1, v.part.clamp_min(0)) & cand
        return Reduction.from_targets(keep_targets(kept | v.protected, v.valid))
