"""TempMe's progressive merging of a video clip's visual tokens: frames first, then clips."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from .aim_merge import bipartite_step, group_means
from .base import ProjectorMethod, VisualTokens

#: frame divisor of a stage that holds the whole clip (every frame index // it is 0)
WHOLE = 1 << 62


def stage_divisors(frames: int, merge_frames: tuple[int, ...]) -> list[int]:
    """The stages of a clip of ``frames`` frames: stage ``s`` puts frame ``f`` in group
    ``f // d[s]``. ``d[0] = 1`` (single frames); each ClipMe stage joins ``merge_frames[s-1]``
    adjacent groups (pairs when empty) until one group holds the clip; the last stage always
    holds the whole clip, also when the listed stages stop short of it."""
    divs, d = [1], 1
    factors = iter(merge_frames) if merge_frames else itertools.repeat(2)
    while d < frames and (k := next(factors, None)) is not None:
        d *= k
        divs.append(d)
    divs[-1] = WHOLE
    return divs


def stage_counts(m: int, keep: int, stages: int) -> list[int]:
    """Tokens left after each stage: ``n_s = round(m (keep/m)^((s+1)/S))``, ``n_{S-1} = keep``
    (every stage keeps the same fraction; computed in Python floats so the result does not
    depend on the device)."""
    if m == 0:
        return [keep] * stages
    return [round(m * (keep / m) ** ((s + 1) / stages)) for s in range(stages - 1)] + [keep]


@register
@dataclass
class TempMe(ProjectorMethod):
    """TempMe's progressive token merging of a video clip (Shen, Zhao, Jin, Wu, Ding, Yao,
    Zhou, "TempMe: Video Temporal Token Merging for Efficient Text-Video Retrieval", ICLR
    2025, arXiv:2409.01156), training-free part only, per clip.

    TempMe runs inside a CLIP ViT: *ImgMe* merges tokens within each frame (ToMe's bipartite
    matching) in the early layers, then *ClipMe* stages concatenate adjacent clips (2-2-3
    frames: 12 frames -> 6 -> 3 -> 1 clip) and merge across the joined frames. Here the clip's
    visual tokens (one row; frame ``f`` is part ``f``) go through ``S`` stages once:

    - stage 0 (ImgMe): the groups are single frames; stage ``s >= 1`` (ClipMe) joins
      ``merge_frames[s-1]`` adjacent groups (default: pairs until one group holds the clip; a
      trailing incomplete group stays as it is: 5 frames -> {0,1},{2,3},{4}); the last stage
      holds the whole clip. An image (one frame) has ``S = 1``: AIM's per-image merging.
    - stage ``s`` ends with ``n_s = round(m (keep/m)^((s+1)/S))`` tokens (``m``: the clip's
      reducible tokens; ``n_{S-1} = keep`` exactly). Within a stage, bipartite steps repeat:
      the alive tokens alternate A, B in token order; each ``a ∈ A`` draws its edge to
      ``b(a) = argmax_{b ∈ B, g(b) = g(a)} cos(x̄_a, x̄_b)`` (``g``: the stage's group), and
      the ``r = min(m' - n_s, ⌊m'/2⌋)`` strongest edges of the whole row merge A into B.
      ``x̄_t = Σ_{i ∈ t} x_i / |t|``, the mean of the original projector outputs that token
      ``t`` holds, is the metric and the output.

    If no group has an edge left (one-token groups), the stage stops short and the next
    stage's larger groups continue; the last stage can always reach ``keep``.

    **Ours.** The projector site instead of inside the ViT (TempMe's merges sit between
    attention and MLP of chosen layers), and geometric per-stage counts instead of TempMe's
    fixed per-layer ``r``, so that every clip keeps exactly ``keep`` tokens. TempMe's LoRA and
    its learned temporal position embedding (trained on MSR-VTT) are out of scope. Protected
    tokens (OneVision's newline) are kept unchanged; ties go to the lower index.

    **Positions.** A merged token keeps the position of its B token (its representative: the
    token that survived every step).

    Attributes:
        merge_frames: adjacent groups joined per ClipMe stage (TempMe: ``(2, 2, 3)``); empty:
            pairs until one group holds the clip.
    """

    name: ClassVar[str] = "tempme"

    merge_frames: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(k < 2 for k in self.merge_frames):
            raise ValueError(
                f"TempMe.merge_frames joins at least 2 groups per stage, got {self.merge_frames}"
            )

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        u, n = v.valid.shape
        dev = v.x.device
        cand = v.candidates
        frames = [1] * u if v.frames is None else v.frames.tolist()
        divs = [stage_divisors(f, self.merge_frames) for f in frames]
        m, k = cand.sum(1).tolist(), keep.tolist()
        counts = [stage_counts(mi, ki, len(d)) for mi, ki, d in zip(m, k, divs, strict=True)]
        depth = max((len(d) for d in divs), default=1)
        # rows with fewer stages hold their whole clip at keep in the stages they lack
        div = torch.tensor([d + [WHOLE] * (depth - len(d)) for d in divs], device=dev)
        count = torch.tensor([c + [c[-1]] * (depth - len(c)) for c in counts], device=dev)
        frame = v.part.clamp_min(0)
        x = v.x.to(torch.promote_types(v.x.dtype, torch.float32))
        ar = torch.arange(n, device=dev).expand(u, n)
        rep = ar.clone()  # the representative of every original token
        alive = cand.clone()
        for s in range(depth):
            group = frame // div[:, s : s + 1]
            while True:
                cur = alive.sum(1)
                excess = cur - count[:, s]
                if not bool((excess > 0).any()):
                    break
                r = torch.minimum(excess, cur // 2).clamp_min(0)
                t = bipartite_step(group_means(x, rep, cand), alive, r, group)
                if bool((t == ar).all()):
                    break  # no edge left within the groups: the next stage's are larger
                alive = alive & (t == ar)
                rep = t.gather(1, rep)
        target = torch.where(cand, rep, torch.where(v.valid, ar, -1))
        return Reduction.from_targets(target)
