"""Hidden-state reduction inside a decoder LLM at layer K (the ``"decoder"`` site).

At the input of layer K the adapter (:mod:`tokenmerge.adapters.hf_decoder`) hands the method

- ``sig.x``: the hidden states entering layer K, ``[B, N, C]``;
- ``sig.q``, ``sig.k``: queries and keys of layer K-1's attention (post-RoPE, key heads
  repeated for GQA) - only the last query for ``query = "last"`` methods, all of them for
  ``query = "all"``; ``sig.attn`` is their attention (computed at that layer only);
- ``state``: ``protected`` = tokens outside the reducible span, ``valid`` = not padding;
- ``r``: ``[B]`` span tokens to remove per sample.

and applies the returned :class:`~tokenmerge.core.reduction.Reduction` to the residual stream.
Kept tokens keep their **original position ids** (RoPE is evaluated at the original positions,
as FastV and HoliTom do), and the layers from K on cache only the kept tokens, so decoding
afterwards attends to exactly the reduced cache. Reduction only happens in a prefill (a
forward that starts from an empty cache); the last real token is never removed.

The span is a Python slice over each sample's real tokens (padding excluded): the default
``(4, -1)`` protects four attention-sink tokens and the last token (the query). For a VLM it is
the image tokens; for query-aware text use, end it before the question.

``ratio`` is the fraction of the span removed by the end of the schedule (FastV's R).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register


@dataclass
class DecoderMethod(Method):
    """Base of the layer-K hidden-state methods (site ``"decoder"``).

    Attributes:
        ratio: fraction of the span removed (0 = nothing).
        layer: K, the first layer that runs on the reduced tokens (scores come from K-1).
        span: ``(start, stop)``, a slice over each sample's real tokens that may be reduced.
    """

    site: ClassVar[str] = "decoder"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    #: which queries of layer K-1 the method needs: the last one, or all of them
    query: ClassVar[str] = "last"
    #: needs the video frame of every token (``Signals.cell``): the VLM adapter only
    needs_frames: ClassVar[bool] = False

    ratio: float = 0.0
    layer: int = 2
    span: tuple[int, int | None] = (4, -1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r != 0:
            raise ValueError(
                f"{type(self).__name__} acts at decoder layer K: set its budget with ratio= "
                "(fraction of the span removed), not r="
            )
        # types (ints, floats, the (start, stop) pair) are checked and normalised by Method
        name = type(self).__name__
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(
                f"{name}.ratio must lie in [0, 1] (the fraction of the span removed, e.g. 0.5), "
                f"got {self.ratio!r}"
            )
        if self.layer < 1:
            raise ValueError(
                f"{name}.layer must be >= 1 (scores come from layer K-1), got {self.layer}"
            )

    @classmethod
    def example(cls, r: int) -> DecoderMethod:
        """``r == 0``: keep everything; otherwise remove half the span at layer 1."""
        return cls(ratio=0.0 if r == 0 else 0.5, layer=1, span=(1, -1))

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def schedule(self, depth: int) -> list[tuple[int, float]]:
        """``(layer, fraction of the span kept from that layer on)``, in layer order."""
        if self.layer >= depth:
            raise ValueError(
                f"{type(self).__name__}.layer={self.layer}, but the model has {depth} layers"
            )
        return [(self.layer, 1.0 - self.ratio)]

    def scored(self, layer: int) -> bool:
        """Whether the step before ``layer`` needs layer ``layer - 1``'s queries and keys
        (``False``: the runtime hands it the hidden states only)."""
        return True

    def exact(self, layer: int) -> bool:
        """Whether the step before ``layer`` removes exactly its budget (``False``: at most
        that many, e.g. a merge of whatever is similar enough; the last step must be exact)."""
        return True

    def span_mask(self, position: Tensor, length: Tensor) -> Tensor:
        """``[B, N]`` bool: token at ``position`` (in its own sequence of ``length``) is in
        the span."""
        start, stop = self.span
        n = length[:, None]
        lo = torch.as_tensor(start, device=position.device)
        lo = torch.where(lo < 0, n + lo, lo).clamp(min=0)
        hi = n if stop is None else torch.as_tensor(stop, device=position.device)
        hi = torch.where(hi < 0, n + hi, hi) if stop is not None else hi
        return (position >= lo) & (position < torch.minimum(hi, n - 1))

    def scores(self, sig: Signals) -> Tensor:
        """``[B, N]`` importance (FastV: attention of the last query, averaged over heads)."""
        return sig.attn[:, :, -1, :].mean(1)

    def importance(self, sig: Signals, state: TokenState) -> Tensor:
        """``[B, N]`` what :meth:`keep_mask` ranks by: :meth:`scores` (a method that averages
        over queries overrides this to see which slots are real)."""
        return self.scores(sig)

    def keep_mask(self, sig: Signals, state: TokenState, r: Tensor) -> tuple[Tensor, Tensor]:
        """Top-scored span tokens: returns ``(kept span tokens, span candidates)``."""
        cand = state.valid & ~state.protected
        s = self.importance(sig, state).float().masked_fill(~cand, -math.inf)
        n_keep = cand.sum(1) - r
        order = s.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(s.shape[1], device=s.device).expand_as(order)
        )
        return cand & (rank < n_keep[:, None]), cand

    def plan(
        self, sig: Signals, state: TokenState, r: int | Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(kept span tokens, span candidates, pruning targets)`` for budget ``r``."""
        r = torch.as_tensor(r, device=sig.x.device).expand(sig.x.shape[0])
        keep, cand = self.keep_mask(sig, state, r)
        return keep, cand, _targets(keep | (state.valid & ~cand), state.valid)

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        """Prune: keep the top-scored span tokens and everything outside the span."""
        if not has_work(r):
            return None
        return Reduction.from_targets(self.plan(sig, state, r)[2])


def _targets(keep: Tensor, valid: Tensor) -> Tensor:
    """``from_targets`` targets: kept tokens map to themselves, the rest are dropped."""
    ar = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return torch.where(keep & valid, ar, -1)


@register
@dataclass
class FastV(DecoderMethod):
    """FastV (Chen et al., ECCV 2024): prune a span at layer K by last-query attention.

    "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764.

    At layer K-1, the attention of the last query ``a_j = mean_h softmax(q_N Kᵀ/√d)_j`` ranks
    the span; layer K keeps the top ``round(n_span (1 - R))`` span tokens plus every token
    outside the span, in order, at their original positions. Paper defaults K = 2, R = 0.5.
    """

    name: ClassVar[str] = "fastv"


@register
@dataclass
class AIMPrune(DecoderMethod):
    """AIM (Zhong et al., ICCV 2025): progressive in-LLM pruning by attention PageRank.

    "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
    arXiv:2412.03248.

    Schedule: the span keeps everything before layer ``start``, then a linearly shrinking
    fraction ``keep(l) = 1 - R (l - start + 1) / (end - start + 1)`` up to layer ``end`` (the
    paper, on 28 layers: start 14, end 21, R = 1). ``start``/``end`` default to depth/2 and
    3·depth/4.

    Importance at layer l-1 is PageRank on the attention matrix: with
    ``M = softmax((q Kᵀ/√d) / τ)`` (causal, τ = ``temperature``) and ``π⁰`` uniform over the
    real tokens, ``π^{t+1} = π^t M`` for ``iterations`` steps, and
    ``importance = sqrt(mean_h (π_h)²)``.
    """

    name: ClassVar[str] = "aim_prune"
    query: ClassVar[str] = "all"
    start: int | None = None
    end: int | None = None
    temperature: float = 0.1
    iterations: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0 or self.iterations < 1:
            raise ValueError("temperature must be > 0 and iterations >= 1")

    def schedule(self, depth: int) -> list[tuple[int, float]]:
        start = depth // 2 if self.start is None else self.start
        end = (3 * depth) // 4 if self.end is None else self.end
        if not 1 <= start <= end < depth:
            raise ValueError(
                f"aim_prune needs 1 <= start <= end < depth, got start={start}, end={end}, "
                f"depth={depth}"
            )
        steps = end - start + 1
        return [(l, 1.0 - self.ratio * (l - start + 1) / steps) for l in range(start, end + 1)]

    def scores(self, sig: Signals) -> Tensor:
        if sig.q is None:
            raise RuntimeError("aim_prune needs the queries of the scoring layer")
        logits = (sig.q @ sig.k.transpose(-2, -1)) * sig.scale
        if sig.bias is not None:
            logits = logits + sig.bias
        m = torch.softmax(logits.float() / self.temperature, dim=-1).nan_to_num(0.0)
        valid = torch.isfinite(sig.bias[:, 0, -1]) if sig.bias is not None else None
        n = m.shape[-1]
        pi = m.new_full((*m.shape[:-2], 1, n), 1.0 / n)
        if valid is not None:
            pi = pi * valid[:, None, None, :]
            pi = pi / pi.sum(-1, keepdim=True).clamp_min(1e-12)
        for _ in range(self.iterations):
            pi = pi @ m
        return pi[:, :, 0].pow(2).mean(1).sqrt()


@register
@dataclass
class HoliTomInner(DecoderMethod):
    """HoliTom inner-LLM merge (Shao et al., NeurIPS 2025): FastV, dropped tokens merged.

    "HoliTom: Holistic Token Merging for Fast Video Large Language Models", arXiv:2505.21334.

    FastV's selection (last-query attention at layer K-1 keeps the top ``1 - R`` of the span),
    but a dropped span token is not lost: it is averaged into its most similar kept span token,
    ``t(i) = argmax_{j kept} cos(x_i, x_j)`` on the hidden states entering layer K, and
    ``x_j ← (x_j + Σ_{t(i)=j} x_i) / (1 + |{i : t(i)=j}|)``. Original positions are kept.
    """

    name: ClassVar[str] = "holitom_inner"

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        keep, cand, target = self.plan(sig, state, r)
        x = torch.nn.functional.normalize(sig.x.float(), dim=-1)
        sim = (x @ x.transpose(1, 2)).masked_fill(~keep[:, None, :], -math.inf)
        best = sim.argmax(-1)
        drop = cand & ~keep & keep.any(1, keepdim=True)
        target = torch.where(drop, best, target)
        return Reduction.from_targets(target, mode="mean")


DECODER_METHODS: tuple[str, ...] = ("fastv", "aim_prune", "holitom_inner")
