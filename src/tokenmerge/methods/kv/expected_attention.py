"""Expected Attention: the attention future queries are expected to pay, from their statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import register
from .base import KVContext, KVMethod


def rope_matrix(cos: Tensor, sin: Tensor) -> Tensor:
    """``[..., d, d]`` matrices ``R`` with ``R q = q cos + rotate_half(q) sin``:
    ``R = diag(cos) + diag(sin) P``, ``P`` the matrix of ``rotate_half(x) = (-x₂, x₁)``."""
    d = cos.shape[-1]
    h = d // 2
    p = cos.new_zeros(d, d)
    p[:h, h:] = -torch.eye(h, dtype=cos.dtype, device=cos.device)
    p[h:, :h] = torch.eye(h, dtype=cos.dtype, device=cos.device)
    return torch.diag_embed(cos) + sin[..., :, None] * p


@register
@dataclass
class ExpectedAttention(KVMethod):
    """Expected Attention (Devoto et al., 2025): score each entry by the attention that future
    queries are expected to pay it (kvpress's default press).

    "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
    Distribution", arXiv:2510.00636.

    The pre-RoPE queries ``q`` of the last ``window`` real tokens of the forward give, per
    query head, a Gaussian ``q ~ N(μ, Σ)`` (population mean and covariance). The next
    ``future`` queries sit at positions ``p + t``, ``t = 1..future``, ``p`` the last query's;
    RoPE is linear, so they are averaged through the mean rotation
    ``R̄ = (1/T) Σ_t R_{p+t}``, with ``R_{p+t} = R_t R_p / f`` (``f`` the rope attention
    scaling, 1 for plain RoPE; ``R_p`` is the rotation the last real query was given, so the
    estimate does not depend on how positions are numbered)::

        μ̄ = R̄ μ,   Σ̄ = R̄ Σ R̄ᵀ
        z_j = s μ̄ᵀ k_j + ½ s² k_jᵀ Σ̄ k_j          (log E[exp(s qᵀk_j)] for Gaussian q)
        EA_j = softmax_j(z)                        (over the real non-sink entries)
        score_j = (mean over the query heads of the KV head of EA_j + ε) · ||v_j||

    with ``s`` the attention scale and ``k_j`` the cached (post-RoPE) keys. The first
    ``sinks`` tokens of each sequence are always kept and, as in the paper's implementation,
    left out of the statistics (their queries are outliers) and of the softmax (they would
    absorb most of it); if the window holds no query past the sinks, all its queries are used.

    Attributes:
        window: the last real queries of the forward that give the statistics.
        future: future positions averaged over.
        sinks: first tokens of each sequence always kept.
        covariance: include the ``½ s² kᵀ Σ̄ k`` term (else only the mean query is used).
        vnorm: weight by the value norm ``||v_j||``.
        epsilon: added to the expected attention before the value-norm weighting.
    """

    name: ClassVar[str] = "expected_attention"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    window: int = 512
    future: int = 512
    sinks: int = 4
    covariance: bool = True
    vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.future < 1:
            raise ValueError(
                f"window and future must be >= 1, got window={self.window}, future={self.future}"
            )
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.epsilon}")

    # -------------------------------------------------------------- statistics
    def query_statistics(self, ctx: KVContext) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-RoPE query statistics of the window: ``μ [B, H, d]``, ``Σ [B, H, d, d]``, and
        the rows ``[B]`` of the last real query of each sample among the forward's tokens."""
        n = min(self.window, ctx.n_new)
        q = ctx.raw_queries(n).float()  # [B, H, n, d]
        qv = ctx.query_valid[:, -n:]
        # positions of the window's tokens: its entries are the last n of the cache
        qpos = ctx.position[:, 0, -n:]
        w = qv & (qpos >= self.sinks)
        w = torch.where(w.any(1, keepdim=True), w, qv).to(q.dtype)  # all sinks: use them
        cnt = w.sum(1).clamp_min(1)[:, None, None]
        mu = torch.einsum("bn,bhnd->bhd", w, q) / cnt
        c = q - mu[:, :, None]
        cov = torch.einsum("bn,bhni,bhnj->bhij", w, c, c) / cnt[..., None]
        ar = torch.arange(ctx.n_new, device=qv.device)
        last = torch.where(ctx.query_valid, ar, -1).amax(1).clamp_min(0)
        return mu, cov, last

    def mean_rotation(self, ctx: KVContext, last: Tensor) -> Tensor:
        """``R̄ [B, d, d]``: the rotation of the next ``future`` positions after each sample's
        last real query, averaged."""
        if ctx.rope_fn is None or ctx.query_rope is None:
            raise RuntimeError(
                "expected_attention needs the layer's rotary embedding (rope_fn and query_rope "
                "in the KVContext); this model or context does not provide it"
            )
        cos_q, sin_q = ctx.query_rope  # [B, n_new, d]
        b = cos_q.shape[0]
        rows = last.to(cos_q.device)[:, None, None].expand(b, 1, cos_q.shape[-1])
        r_p = rope_matrix(cos_q.gather(1, rows)[:, 0].float(), sin_q.gather(1, rows)[:, 0].float())
        device = cos_q.device
        cos_t, sin_t = ctx.rope_fn(torch.arange(1, self.future + 1, device=device))
        r_t = rope_matrix(cos_t.float().mean(0), sin_t.float().mean(0))  # linear in cos, sin
        f = ctx.rope_fn(torch.zeros(1, dtype=torch.long, device=device))[0][0, 0].float()
        return r_t.to(device) @ r_p / f

    # -------------------------------------------------------------- score
    def score(self, ctx: KVContext) -> Tensor:
        mu, cov, last = self.query_statistics(ctx)
        rot = self.mean_rotation(ctx, last).to(mu.device)
        mu = torch.einsum("bij,bhj->bhi", rot, mu)
        k = ctx.keys.float().repeat_interleave(ctx.groups, dim=1)  # [B, H, L, d]
        z = torch.einsum("bhd,bhld->bhl", mu, k) * ctx.scale
        if self.covariance:
            cov = torch.einsum("bij,bhjk,blk->bhil", rot, cov, rot)
            z = z + 0.5 * ctx.scale**2 * torch.einsum("bhli,bhij,bhlj->bhl", k, cov, k)
        sink = ctx.position < self.sinks  # [B, H_kv, L]
        allowed = ctx.valid[:, None, :] & ~sink.repeat_interleave(ctx.groups, dim=1)
        ea = torch.softmax(z.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
        s = ctx.group_mean(ea) + self.epsilon
        if self.vnorm:
            s = s * ctx.values.float().norm(dim=-1)
        return s.masked_fill(sink, math.inf)
