"""Pruning baselines: random pruning and EViT-style top-k by CLS attention.

Also home of the small selection helpers that the other score-based methods (GTP, Token
Transforming, VisionZip) share: which tokens may be touched, the ``r`` lowest-scoring ones, and
the CLS-attention importance with its fallback for models without a CLS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from .base import Method, has_work, register, static_kept


# ---------------------------------------------------------------------------------- helpers
def candidates(state: TokenState) -> Tensor:
    """``[B, N]`` tokens a method may drop, merge or merge into: real and not protected."""
    return state.valid & ~state.protected


def per_sample(r: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """The budget as a ``[B]`` long tensor."""
    r_t = torch.as_tensor(r, device=device, dtype=torch.long)
    return r_t.expand(batch) if r_t.dim() == 0 else r_t


def lowest(score: Tensor, allowed: Tensor, r: int | Tensor) -> Tensor:
    """``[B, N]`` bool: the ``r`` (int or ``[B]``) lowest-scoring ``allowed`` tokens.

    Ties go to the lower index (stable sort), so the choice is deterministic. At most the number
    of allowed tokens is returned.
    """
    b, n = score.shape
    s = score.masked_fill(~allowed, torch.inf)
    order = s.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=score.device).expand(b, n)
    )
    return (rank < per_sample(r, b, score.device).unsqueeze(1)) & allowed


def has_cls(state: TokenState) -> bool:
    """Whether the first token is a protected prefix token (CLS) whose attention ranks tokens."""
    return state.n_prefix > 0 or bool(state.protected[:, 0].all())


def attention(sig: Signals, state: TokenState) -> Tensor:
    """``[B, H, N, N]`` attention probabilities (the patch's bias already hides padding)."""
    return sig.attn


def cls_attention(sig: Signals, state: TokenState) -> Tensor:
    """``[B, N]`` attention of the first token, averaged over heads, padding hidden."""
    return sig.cls_attn


def importance(sig: Signals, state: TokenState) -> Tensor:
    """``[B, N]`` token importance from attention.

    With a CLS token: the CLS token's attention to every token, averaged over heads (one row of
    attention, ``O(N)`` per head). Without one (e.g. average-pooled ViTs): the attention each
    token *receives*, averaged over the real queries and the heads; this needs the full
    attention matrix (an explicit ``QKᵀ`` at that layer).
    """
    if has_cls(state):
        return cls_attention(sig, state)
    attn = attention(sig, state)
    q = state.valid.to(attn.dtype)
    return (attn * q[:, None, :, None]).sum(2).mean(1) / q.sum(1, keepdim=True)


def targets_from_drop(drop: Tensor, valid: Tensor) -> Tensor:
    """Targets for pruning: every kept token is its own representative, dropped ones and
    padding get ``-1``."""
    b, n = drop.shape
    ar = torch.arange(n, device=drop.device).expand(b, n)
    return torch.where(drop | ~valid, -1, ar)


# ---------------------------------------------------------------------------------- methods
@register
@dataclass
class RandomPrune(Method):
    """Random pruning: drop ``r`` unprotected tokens chosen uniformly at random per layer.

    The baseline every scoring rule has to beat. The draws come from a private
    ``torch.Generator`` seeded with ``(seed, layer)`` at every forward, and each token's score
    is looked up by its *original* position: ``u_l = rand(N0)``, ``score_i = u_l[pos_i]``, and
    the ``r`` lowest-scoring unprotected tokens are dropped. A token's fate therefore depends
    only on ``(seed, layer, original position)`` and on which tokens are still there, never on
    the other samples of the batch or on the global RNG: the result is reproducible and batch
    independent. The price is that all samples of a batch that still hold the same tokens
    drop the same positions; change ``seed`` for another draw.

    Attributes:
        seed: seed of the per-layer draws.
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + layer) % (2**63))
        noise = torch.rand(state.n_orig, generator=g).to(sig.x.device)
        drop = lowest(noise[state.pos], candidates(state), r)
        kept = static_kept(state, r)
        return Reduction.from_targets(
            targets_from_drop(drop, state.valid), kept=kept, selection=True
        )


@register
@dataclass
class EViT(Method):
    """EViT-style attentive-token selection, training-free (Liang et al., "Not All Patches Are
    What You Need: Expediting Vision Transformers via Token Reorganizations", ICLR 2022,
    arXiv:2202.07800).

    In every block, after attention, rank the unprotected tokens by the attention the CLS
    token pays them, averaged over heads, ``a_i = (1/H) Σ_h softmax(q_cls k_hᵀ/√d)_i``; keep the
    most attentive and drop the ``r`` least attentive ones. With ``fuse`` the ``r + 1`` least
    attentive tokens ``P`` are instead fused into one "inattentive" token, so that ``r``
    tokens are still removed:

        ``x_fused = Σ_{i∈P} a_i s_i x_i / Σ_{i∈P} a_i s_i``,   ``s_fused = Σ_{i∈P} s_i``

    EViT's fused token is ``Σ a_i x_i`` with the raw (unnormalised) attention; without
    fine-tuning its norm would depend on how much attention the set gets, so we take the
    weighted mean instead, and give it the summed size. The fused token sits at the position
    of the most attentive token of ``P``.

    EViT was trained with its reorganisation; here it runs on the pretrained model as is, and
    there the fused token does not pay. On DINOv2-S (14 images, CLS-feature cosine to the
    unreduced model, mean / 5th percentile, r = 8 and 16 per layer): dropping gives
    .9945 / .9867 and .9684 / .9233; fusing gives .9802 / .9388 and .9434 / .8665 with
    proportional attention (the fused token's ``log s`` bias turns it into an attention sink)
    and .9931 / .9834 and .9617 / .9202 without (``prop_attn=False``). Random pruning gives
    .9905 / .9801 and .9629 / .9192. ``fuse`` is therefore off by default; if you turn it on,
    also pass ``prop_attn=False``.

    Models without a CLS token rank by the mean attention received (full ``QKᵀ``, see
    :func:`importance`). The CLS row itself costs one extra ``q_cls Kᵀ`` per layer.

    Attributes:
        fuse: fuse the inattentive tokens into one token (True) or drop them (False).
    """

    name: ClassVar[str] = "evit"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    fuse: bool = False

    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        if not has_work(r):
            return None
        score = importance(sig, state)
        cand = candidates(state)
        if not self.fuse:
            target = targets_from_drop(lowest(score, cand, r), state.valid)
            return Reduction.from_targets(target, kept=static_kept(state, r), selection=True)
        r_t = per_sample(r, score.shape[0], score.device)
        drop = lowest(score, cand, torch.where(r_t > 0, r_t + 1, 0))
        target = targets_from_drop(drop, state.valid)
        rep = score.masked_fill(~drop, -torch.inf).argmax(1, keepdim=True)  # most attentive
        target = torch.where(drop, rep, target)
        size = state.sizes(score.dtype)
        a = score.clamp_min(torch.finfo(score.dtype).tiny) * drop
        # weights a_i * S / Σ a_j s_j: the fused token is the (a·s)-weighted mean of P and its
        # size is exactly S = Σ s_j (a mean is unchanged by rescaling all of its weights)
        scale = (size * drop).sum(1, keepdim=True) / (a * size).sum(1, keepdim=True).clamp_min(
            torch.finfo(score.dtype).tiny
        )
        weight = torch.where(drop, a * scale, torch.ones_like(a))
        return Reduction.from_targets(target, weight, kept=static_kept(state, r), selection=False)
