"""Per-forward token state and the signals a method may ask an adapter for.

A :class:`TokenState` is created fresh at the first patched layer of every forward pass and is
never shared between forwards, models or threads. It holds only what cannot be derived:
the sizes, the map from original tokens to current ones (``source``), and which original
tokens are protected. Positions, protected flags and the padding mask of the current tokens
are derived from those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .reduction import Reduction


@dataclass
class TokenState:
    """Token bookkeeping for one forward pass.

    Attributes:
        size: ``[B, N]`` how many original tokens each current token stands for; ``None``
            until the first reduction (every size is 1). A size of 0 marks padding.
        source: map from the original tokens to the current ones (composition of every step).
        orig_protected: ``[B, N0]`` original tokens that must never be merged or dropped
            (CLS, registers, distillation token, special text tokens).
        grid: ``(h, w)`` of the original patch grid, when the tokens come from an image.
        n_prefix: number of leading non-patch tokens in the original sequence.
        tokens_per_layer: tokens per sample after each patched layer (``[B]`` tensors).
        cache: scratch space that a method may use for the duration of this forward
            (GTP's shrinking graph, for instance).
        depth: number of patched layers in this forward (``None`` if unknown); methods whose
            hyper-parameters follow the depth (PiToMe's margin, ToFu's switch layer) read it.
        uniform: known statically (without reading the data): there is no padding and every
            sample has the same number of tokens (static budgets keep it; ``torch.compile``
            graphs then need no data-dependent branch).
    """

    size: Tensor | None
    source: Reduction
    orig_protected: Tensor
    grid: tuple[int, int] | None = None
    n_prefix: int = 0
    tokens_per_layer: list[Tensor] = field(default_factory=list)
    tokens_in: Tensor | None = None  # [B] real tokens per sample at the start (padded batches)
    cache: dict[str, Any] = field(default_factory=dict)
    depth: int | None = None
    uniform: bool = False  # known without the data: no padding, every sample equally long

    @staticmethod
    def start(
        x: Tensor,
        protected: Tensor,
        size: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        n_prefix: int = 0,
        depth: int | None = None,
    ) -> TokenState:
        """A fresh state for the token batch ``x`` (``[B, N, C]``)."""
        b, n, _ = x.shape
        return TokenState(
            size=size,
            tokens_in=None if size is None else (size > 0).sum(1),
            source=Reduction.identity(b, n, x.device),
            orig_protected=protected,
            grid=grid,
            n_prefix=n_prefix,
            depth=depth,
            uniform=size is None,
        )

    @property
    def n_orig(self) -> int:
        return self.source.n_in

    @property
    def pos(self) -> Tensor:
        """``[B, N]`` original index of each current token's representative."""
        return self.source.rep

    @property
    def protected(self) -> Tensor:
        """``[B, N]`` current tokens that must not be merged or dropped."""
        return self.orig_protected.gather(1, self.pos)

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` current tokens that are real (not padding)."""
        if self.size is None:
            return torch.ones_like(self.pos, dtype=torch.bool)
        return self.size > 0

    @property
    def counts(self) -> Tensor:
        """``[B]`` number of real tokens per sample."""
        return self.valid.sum(1)

    def sizes(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The sizes, materialised (ones before the first reduction)."""
        if self.size is None:
            return torch.ones(self.pos.shape, dtype=dtype, device=self.pos.device)
        return self.size.to(dtype)

    def attn_bias(self, proportional: bool, dtype: torch.dtype) -> Tensor | None:
        """Additive attention bias over keys, ``[B, 1, 1, N]``, or ``None`` if it would be 0.

        Proportional attention (ToMe, eq. 1): ``softmax(q k^T / sqrt(d) + log s)``; padding
        keys (size 0) get ``-inf`` either way. Returns ``None`` before any reduction so that the
        unreduced model runs exactly as without tokenmerge.
        """
        if self.size is None:
            return None
        if proportional:
            bias = self.size.to(dtype).log()
        else:
            if self.uniform or bool(self.valid.all()):
                return None
            bias = torch.zeros(self.size.shape, dtype=dtype, device=self.size.device)
            bias = bias.masked_fill(~self.valid, -math.inf)
        return bias[:, None, None, :]

    def reduce(self, x: Tensor, red: Reduction) -> Tensor:
        """Apply ``red`` to ``x`` and advance the state; returns the reduced features."""
        y, self.size = red.apply(x, self.size)
        self.source = self.source.compose(red)
        self.uniform = self.uniform and red.uniform
        return y

    def unmerge(self, y: Tensor) -> Tensor:
        """Spread current tokens ``y`` (``[B, N, C]``) back onto the original token grid."""
        return self.source.unmerge(y)


@dataclass
class Signals:
    """What one layer's attention exposes to a method, computed lazily (once each).

    Attributes:
        x: ``[B, N, C]`` hidden states after the attention residual (what gets reduced).
        q: ``[B, H, N, d]`` queries, when the method asked for them.
        k: ``[B, H, N, d]`` keys.
        scale: the attention's logit scale (``1/sqrt(d)`` for most models).
        bias: the additive attention bias that was used at this layer (or ``None``).
        cell: ``[B, N]`` long, for the video tokens of a VLM: the position within its frame,
            numbered so that the same position in every frame of one clip has the same id;
            ``-1`` for every other token (set for decoder methods that need frames).
    """

    x: Tensor
    k: Tensor | None  # None: a decoder step that reads no attention (only ``x``)
    q: Tensor | None = None
    scale: float = 1.0
    bias: Tensor | None = None
    cell: Tensor | None = None
    # caches (plain fields, not functools.cached_property: its lock breaks torch.compile graphs)
    _metric: Tensor | None = field(default=None, repr=False)
    _attn: Tensor | None = field(default=None, repr=False)
    _cls_attn: Tensor | None = field(default=None, repr=False)

    @property
    def metric(self) -> Tensor:
        """ToMe's similarity metric: keys averaged over heads, ``[B, N, d]``."""
        if self._metric is None:
            self._metric = self.k.mean(1)
        return self._metric

    def _queries(self) -> Tensor:
        if self.q is None:
            raise RuntimeError("this method did not declare that it needs queries/attention")
        return self.q

    def _softmax(self, logits: Tensor) -> Tensor:
        if self.bias is not None:
            logits = logits + self.bias
        return logits.softmax(-1)

    @property
    def attn(self) -> Tensor:
        """Attention probabilities ``[B, H, N, N]`` (computed explicitly: costs one QK^T)."""
        if self._attn is None:
            self._attn = self._softmax((self._queries() @ self.k.transpose(-2, -1)) * self.scale)
        return self._attn

    @property
    def cls_attn(self) -> Tensor:
        """Attention of the first token (CLS) to every token, averaged over heads: ``[B, N]``."""
        if self._cls_attn is None:
            if self._attn is not None:
                self._cls_attn = self._attn[:, :, 0].mean(1)
            else:
                q = self._queries()[:, :, :1]
                logits = (q @ self.k.transpose(-2, -1)) * self.scale
                self._cls_attn = self._softmax(logits)[:, :, 0].mean(1)
        return self._cls_attn
