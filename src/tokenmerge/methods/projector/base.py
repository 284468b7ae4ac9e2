"""The projector site: visual tokens reduced once, after the projector and before the LLM.

A vision-language model (LLaVA, LLaVA-NeXT/OneVision, Qwen2-VL) turns every image into a run
of *visual tokens* (the projector's outputs) that it places in the LLM's input sequence. A
projector-site method sees the visual tokens of one image per row (:class:`VisualTokens`) and
returns a :class:`~tokenmerge.core.reduction.Reduction` of them; the VLM adapter
(:mod:`tokenmerge.adapters.hf_vlm`) puts the reduced tokens back into the sequence in place of
the image's, so the LLM, its KV cache and ``generate`` all run on fewer tokens.

Positions. A reduced token keeps the **original position of its representative** (1-D
position ids for LLaVA, the 3-D M-RoPE ``(t, h, w)`` positions for Qwen2-VL), so text after the
image keeps its positions and RoPE stays exact. A method's representative is a kept token
itself (pruning), the destination of a merge, or one token of a pooled cell (the cell's first
token in raster order).

Budget. ``ratio`` is the fraction of each image's reducible tokens removed (``0`` = nothing:
bit-identical). An image with ``n`` reducible tokens keeps :meth:`ProjectorMethod.keep_count`
``= max(1, round(n (1 - ratio)))`` of them; methods whose output count is set by a pooling
grid (M3, downsampling) keep the count their grid gives and say so with
``exact_counts = False``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ...core.state import Signals, TokenState
from ..base import Method
from ..decoder import DecoderMethod

#: what a projector method may ask the adapter for, besides the visual tokens themselves
PROJECTOR_NEEDS = frozenset({"saliency", "text"})


@dataclass
class VisualTokens:
    """The visual tokens of ``U`` images or video clips (one per row, right-padded to ``n``).

    Attributes:
        x: ``[U, n, C]`` the projector's outputs, i.e. the LLM's input embeddings of the image.
        valid: ``[U, n]`` the slot holds a token of the image (False: padding).
        protected: ``[U, n]`` tokens that must be kept unchanged (LLaVA-NeXT's row-end
            ``image_newline`` tokens). Protected tokens are never removed, merged into or
            counted in the budget.
        coord: ``[U, n, 2]`` long ``(row, col)`` of each token in its part's grid (``-1`` for
            protected tokens and padding).
        part: ``[U, n]`` long, which grid the token belongs to (LLaVA-NeXT: ``0`` = the base
            image, ``1`` = the AnyRes tiles; otherwise ``0``); ``-1`` for protected/padding.
            Pooling never mixes parts.
        grid: ``[U, P, 2]`` long ``(rows, cols)`` of each part (``0, 0`` when absent).
        frames: ``[U]`` long, the frames of each row: ``1`` for an image; for a video clip
            ``F > 1``, and then part ``f`` is frame ``f`` (tokens of one frame share a part,
            ``coord`` is the position within the frame). ``None``: every row is an image.
        saliency: ``[U, n]`` the vision tower's attention to each token at its feature layer
            (the CLS token's attention averaged over heads, or, for towers without CLS, the
            mean attention received), or ``None`` when the method did not ask for it.
        text: ``[U, t, C]`` the LLM input embeddings of the text that follows the image in its
            sample (the question), or ``None`` when not asked for.
        text_valid: ``[U, t]`` real text tokens.
        generator: a seeded generator for random methods (the adapter seeds it per forward).
    """

    x: Tensor
    valid: Tensor
    protected: Tensor
    coord: Tensor
    part: Tensor
    grid: Tensor
    frames: Tensor | None = None
    saliency: Tensor | None = None
    text: Tensor | None = None
    text_valid: Tensor | None = None
    generator: torch.Generator | None = None

    @property
    def candidates(self) -> Tensor:
        """``[U, n]`` tokens a method may drop or merge: real and not protected."""
        return self.valid & ~self.protected

    @staticmethod
    def grid_of(x: Tensor, rows: int, cols: int) -> VisualTokens:
        """Visual tokens of ``U`` images that are all one ``rows x cols`` grid in raster
        order (LLaVA-1.5's layout): the common case, and what the tests build."""
        u, n, _ = x.shape
        if n != rows * cols:
            raise ValueError(f"{n} tokens are not a {rows}x{cols} grid")
        ar = torch.arange(n, device=x.device)
        coord = torch.stack([ar // cols, ar % cols], -1).expand(u, n, 2)
        ones = torch.ones(u, n, dtype=torch.bool, device=x.device)
        grid = torch.tensor([[rows, cols]], device=x.device).expand(u, 1, 2)
        return VisualTokens(
            x=x,
            valid=ones,
            protected=~ones,
            coord=coord,
            part=torch.zeros(u, n, dtype=torch.long, device=x.device),
            grid=grid,
        )


@dataclass
class ProjectorMethod(Method):
    """Base of the projector-site methods (site ``"projector"``).

    Attributes:
        ratio: fraction of each image's reducible tokens removed (``0`` keeps everything).
        vtu: DyMU's *virtual token unmerging* (Wang et al., "DyMU: Dynamic Merging and
            Virtual Unmerging for Efficient VLMs", arXiv:2504.17040): the LLM's residual
            stream, norms and MLPs run on the merged tokens, but every attention layer sees
            the full sequence. With ``h`` the merged stream and ``m(j)`` the merged token that
            original position ``j`` belongs to, each layer computes
            ``Q, K, V = proj(norm(h))[m(j)]`` rotated at the original positions ``j`` (RoPE,
            M-RoPE), attention over the full causal sequence, and re-merges its output
            ``o_s = mean_{j: m(j)=s} O_j`` before ``o_proj``'s residual add. The KV cache holds
            the full sequence, so decoding is unchanged. Saves the MLP and norm FLOPs, not
            attention's. Needs a method that *merges* every token (pruning methods are
            refused at run time: a dropped token has no merged token to stand for it).
    """

    site: ClassVar[str] = "projector"
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    #: what the adapter must supply in :class:`VisualTokens` (subset of ``PROJECTOR_NEEDS``)
    visual_needs: ClassVar[frozenset[str]] = frozenset()
    #: reduces video clips only (frames); the adapter refuses it on images
    video_only: ClassVar[bool] = False

    ratio: float = 0.0
    vtu: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.r != 0:
            raise ValueError(
                f"{name} reduces the visual tokens once, before the LLM: set its budget with "
                "ratio= (fraction of each image's tokens removed), not r="
            )
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(
                f"{name}.ratio must lie in [0, 1) (the fraction of each image's tokens "
                f"removed, e.g. 0.75), got {self.ratio!r}"
            )
        if not self.visual_needs <= PROJECTOR_NEEDS:
            raise ValueError(f"{name}.visual_needs: unknown {set(self.visual_needs)}")

    @classmethod
    def example(cls, r: int) -> ProjectorMethod:
        """``r == 0``: keep everything; otherwise remove three quarters of every image."""
        return cls(ratio=0.0 if r == 0 else 0.75)

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def keep_count(self, n: Tensor) -> Tensor:
        """``[U]`` tokens each image keeps of its ``n`` reducible ones: ``max(1, round(n (1 -
        ratio)))`` (all of them at ratio 0)."""
        if self.ratio == 0.0:
            return n
        keep = torch.round(n.double() * (1.0 - self.ratio)).long()
        return torch.minimum(keep.clamp_min(1), n)

    def inner(self, depth: int) -> DecoderMethod | None:
        """A second stage inside the LLM (of ``depth`` layers) that the adapter runs after the
        projector site, on the visual tokens that entered it (HoliTom's in-LLM merge); ``None``
        (the default): the method acts at the projector only."""
        return None

    @abstractmethod
    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        """The reduction of ``v`` that leaves ``keep[u]`` reducible tokens in image ``u`` (plus
        its protected tokens, unchanged). Padding must map to nothing (``-1``)."""

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        raise TypeError(
            f"{type(self).__name__} is a projector-site method: it runs once on the visual "
            "tokens of a vision-language model (tm.apply on a LLaVA or Qwen2-VL model), not "
            "inside an encoder's blocks"
        )


# ----------------------------------------------------------------------------- shared helpers
def keep_targets(keep: Tensor, valid: Tensor) -> Tensor:
    """``from_targets`` targets of a pruning: kept tokens are their own outputs, the rest and
    padding are dropped (``-1``). ``keep`` must include the protected tokens."""
    ar = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return torch.where(keep & valid, ar, -1)


def top_k(score: Tensor, allowed: Tensor, k: Tensor) -> Tensor:
    """``[U, n]`` bool: the ``k[u]`` highest-scoring ``allowed`` tokens of each row (ties to the
    lower index, so the choice is deterministic)."""
    u, n = score.shape
    s = score.float().masked_fill(~allowed, -math.inf)
    order = s.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=score.device).expand(u, n)
    )
    return (rank < k[:, None]) & allowed
