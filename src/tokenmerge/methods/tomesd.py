"""ToMe for Stable Diffusion (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion",
CVPR Workshops 2023, arXiv:2303.17604): merge -> compute -> unmerge around a sub-layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, register
from .matching import unit

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
#: the downsampling factors of a UNet's levels that ``max_downsample`` may name
DOWNSAMPLES = (1, 2, 4, 8)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64, without overflowing: two 16-bit
    halves of ``c``, each product below ``2**48``."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' ``lowbias32``) on int64 tensors: the same bits on
    every device and in every batch layout, unlike a ``torch.Generator``'s stream."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed: int, step: Tensor, block: int) -> Tensor:
    """``[B]`` int64: one random stream per sample, from the seed, the sample's step key (its
    timestep) and the block index."""
    k = mix32(((seed & _M32) ^ mix32(step)) + _GOLDEN)
    return mix32(k ^ mix32(torch.full_like(step, (block + 1) * _GOLDEN)))


def grid_destinations(
    keys: Tensor, h: int, w: int, sx: int, sy: int, random: bool
) -> tuple[Tensor, Tensor]:
    """tomesd's destinations: one token in every full ``sy x sx`` cell of the ``h x w`` grid.

    With ``random`` the cell's token is drawn from the sample's stream ``keys`` (``[B]``),
    else it is the cell's top-left token. Tokens outside the full cells (the last rows and
    columns when ``sy`` or ``sx`` does not divide the grid) are sources.

    Returns ``(dst, src)``: ``[B, n_dst]`` and ``[B, h*w - n_dst]`` token indices, each in
    position order.
    """
    b, dev = keys.shape[0], keys.device
    hs, ws = h // sy, w // sx
    cy = torch.arange(hs, device=dev).view(hs, 1).expand(hs, ws)
    cx = torch.arange(ws, device=dev).view(1, ws).expand(hs, ws)
    if random:
        cell = (cy * ws + cx).reshape(1, -1)
        pick = mix32(keys.view(-1, 1) ^ mix32(cell)) % (sx * sy)  # [B, cells]
    else:
        pick = torch.zeros(b, hs * ws, dtype=torch.long, device=dev)
    row = cy.reshape(1, -1) * sy + pick // sx
    col = cx.reshape(1, -1) * sx + pick % sx
    is_dst = torch.zeros(b, h * w, dtype=torch.bool, device=dev)
    is_dst.scatter_(1, row * w + col, True)
    order = (~is_dst).long().argsort(dim=1, stable=True)  # destinations first, each in order
    n_dst = hs * ws
    return order[:, :n_dst], order[:, n_dst:]


def merge_targets(metric: Tensor, dst: Tensor, src: Tensor, r: int) -> Tensor:
    """ToMe's matching from sources to fixed destinations, as ``from_targets`` targets.

    Every source token draws an edge to its most similar destination (cosine of ``metric``);
    the ``r`` sources with the strongest edges merge into their destinations, the rest stay.
    """
    b, n, d = metric.shape
    m = unit(metric)
    ms = m.gather(1, src.unsqueeze(-1).expand(-1, -1, d))
    md = m.gather(1, dst.unsqueeze(-1).expand(-1, -1, d))
    best, j = (ms @ md.transpose(1, 2)).max(-1)  # [B, n_src]
    top = best.argsort(dim=1, descending=True, stable=True)[:, :r]
    into = dst.gather(1, j.gather(1, top))
    target = torch.arange(n, device=metric.device).repeat(b, 1)
    return target.scatter(1, src.gather(1, top), into)


@register
@dataclass
class ToMeSD(Method):
    """ToMe for Stable Diffusion (Bolya & Hoffman, CVPRW 2023, arXiv:2303.17604).

    The residual stream keeps every token; merging lasts for one sub-layer only. In each
    patched transformer block, with the block's input ``x`` (``N = h*w`` tokens) as metric:

    1. destinations ``D``: one token per ``sy x sx`` cell of the latent grid, drawn at random
       (``random``) or the cell's top-left one; sources ``S``: every other token;
    2. ``S_ij = cos(x_i, x_j)`` for ``i ∈ S``, ``j ∈ D``; each source keeps its best edge
       ``j*(i) = argmax_j S_ij``;
    3. the ``r = ⌊ratio · N⌋`` sources with the largest ``S_i,j*(i)`` merge into their
       destinations: ``M(z)_j = mean({z_j} ∪ {z_i : j*(i) = j, i merged})``;
    4. each chosen sub-layer ``f`` (self-attention; optionally cross-attention and the MLP)
       runs as ``x ← x + U(f(M(norm(x))))``, where the unmerge ``U`` gives every token the
       output of the token it was merged into: ``U(y)_i = y_{j*(i)}``.

    ``ratio`` is at most ``1 - 1/(sx·sy)`` (every source merged). ``max_downsample`` names
    the UNet levels patched by their downsampling factor (1, 2, 4, 8); ``None`` patches the
    highest-resolution level that has attention (SD 1.x/2.x: factor 1; SDXL, whose first
    level has none: factor 2). Every block of a DiT is at factor 1.

    **Randomness.** tomesd draws destinations from a generator that advances over the run,
    so a second image with the same seed gets other destinations. Here each sample's choice
    is a hash of ``(seed, timestep, block)``: a pipeline run with a fixed seed is
    reproducible, every step and block still gets its own draw, the two halves of a
    classifier-free-guidance batch share theirs, a sample's draw does not depend on its
    batch neighbours, and CPU and GPU draw the same destinations.
    """

    name: ClassVar[str] = "tomesd"
    site: ClassVar[str] = "unmerge"

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    random: bool = True
    seed: int = 0
    max_downsample: int | None = None
    self_attn: bool = True
    cross_attn: bool = False
    mlp: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r != 0:
            raise ValueError(
                "ToMeSD sets its budget with ratio= (the fraction of each patched block's "
                "tokens merged, e.g. 0.5), not r="
            )
        if self.sx < 1 or self.sy < 1 or self.sx * self.sy < 2:
            raise ValueError(
                f"ToMeSD's destination cell sx x sy must hold at least 2 tokens (sx, sy >= 1), "
                f"got sx={self.sx}, sy={self.sy}"
            )
        most = 1.0 - 1.0 / (self.sx * self.sy)
        if not 0.0 <= self.ratio <= most:
            raise ValueError(
                f"ToMeSD.ratio must lie in [0, {most:g}] with sx={self.sx}, sy={self.sy} (one "
                f"token of every cell is a destination), got {self.ratio!r}"
            )
        if self.max_downsample is not None and self.max_downsample not in DOWNSAMPLES:
            raise ValueError(
                f"ToMeSD.max_downsample must be one of {DOWNSAMPLES} (a UNet level's "
                f"downsampling factor) or None (the highest-resolution level with attention), "
                f"got {self.max_downsample!r}"
            )
        if not (self.self_attn or self.cross_attn or self.mlp):
            raise ValueError(
                "ToMeSD merges around nothing: set at least one of self_attn, cross_attn, mlp"
            )
        if self.prop_attn:
            raise ValueError(
                "ToMeSD does not track sizes across blocks (every block starts unmerged); "
                "prop_attn is not supported"
            )

    @classmethod
    def example(cls, r: int) -> ToMeSD:
        """``r == 0``: merge nothing; otherwise half of every patched block's tokens."""
        return cls(ratio=0.0 if r == 0 else 0.5)

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def merged(self, n: int, h: int, w: int) -> int:
        """Tokens merged in a block of ``n = h*w`` tokens: ``⌊ratio · n⌋``, at most the
        sources; none on a grid smaller than one cell."""
        n_dst = (h // self.sy) * (w // self.sx)
        return min(int(n * self.ratio), n - n_dst) if n_dst else 0

    def reduction(
        self, x: Tensor, grid: tuple[int, int], step: Tensor, block: int
    ) -> Reduction | None:
        """The merge of one block, or ``None`` when it merges nothing: ``x`` ``[B, N, C]``
        (the block's input, the metric) on the ``grid = (h, w)``; ``step`` ``[B]`` int64 keys
        each sample's draw (its timestep) and ``block`` tells the blocks apart."""
        h, w = grid
        n = x.shape[1]
        r = self.merged(n, h, w)
        if r == 0:
            return None
        keys = stream_keys(self.seed, step, block)
        dst, src = grid_destinations(keys, h, w, self.sx, self.sy, self.random)
        target = merge_targets(x, dst, src, r)
        return Reduction.from_targets(target, kept=n - r, selection=False)

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        raise TypeError(
            "ToMeSD merges around the sub-layers of a diffusion model's transformer blocks "
            "(tm.apply on a diffusers UNet2DConditionModel, Transformer2DModel, "
            "PixArtTransformer2DModel or SD3Transformer2DModel), not between an encoder's "
            "attention and MLP"
        )
