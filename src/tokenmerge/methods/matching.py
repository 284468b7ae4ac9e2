"""Bipartite soft matching, shared by ToMe and the methods built on it."""

from __future__ import annotations

import torch
from torch import Tensor


def unit(x: Tensor) -> Tensor:
    """``x`` scaled to unit L2 norm along the last axis (cosine similarity by dot product)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def split(mergeable: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ToMe's alternating partition into sets A and B, over the mergeable tokens.

    Mergeable tokens alternate A, B, A, ... in position order; the first one is in A when its
    position is even. When the mergeable tokens are contiguous (a ViT: protected prefix, then
    patches) this is the paper's split by even and odd positions; when protected tokens or
    padding sit between them (a [SEP] in the middle of a text pair) it stays balanced, so ``r``
    merges are always possible for ``r <= m // 2`` (``m`` mergeable tokens).

    Returns ``(a, a_ok, b, b_ok)``: ``[B, W]`` positions of the A and B tokens in position order
    (``W = ceil(N / 2)``), and which of those slots hold a token.
    """
    b, n = mergeable.shape
    ar = torch.arange(n, device=mergeable.device).expand(b, n)
    rank = mergeable.long().cumsum(1)  # 1-based rank among the mergeable tokens
    first = torch.where(mergeable, ar, n).amin(1, keepdim=True)
    in_a = mergeable & ((rank + first) % 2 == 1)
    in_b = mergeable & ~in_a
    w = (n + 1) // 2
    a = torch.where(in_a, ar, n + ar).argsort(1)[:, :w]
    bb = torch.where(in_b, ar, n + ar).argsort(1)[:, :w]
    return a, in_a.gather(1, a), bb, in_b.gather(1, bb)


def best_edges(metric: Tensor, mergeable: Tensor) -> tuple[Tensor, Tensor]:
    """Each A token's most similar B token (see :func:`split`): ToMe's ``node_max`` and
    ``node_idx`` (the B token's position), ``[B, ceil(N/2)]``; ``-inf`` where there is no A
    token or no mergeable B token."""
    a, a_ok, bb, b_ok = split(mergeable)
    m = unit(metric)
    d = m.shape[-1]
    ma = m.gather(1, a.unsqueeze(-1).expand(-1, -1, d))
    mb = m.gather(1, bb.unsqueeze(-1).expand(-1, -1, d))
    scores = ma @ mb.transpose(1, 2)
    blocked = ~a_ok[:, :, None] | ~b_ok[:, None, :]
    node_max, j = scores.masked_fill(blocked, -torch.inf).max(-1)
    return node_max, bb.gather(1, j)


def bipartite_targets(
    metric: Tensor,
    mergeable: Tensor,
    r: int | Tensor,
    threshold: Tensor | float | None = None,
) -> Tensor:
    """ToMe's bipartite soft matching, as merge targets for :meth:`Reduction.from_targets`.

    Tokens alternate into sets A and B (:func:`split`). Every A token draws an edge to its
    most similar B token (cosine of ``metric``); the ``r`` strongest edges are kept (or, with
    ``threshold``, every edge above it), and each kept edge merges its A token into its B token.

    Args:
        metric: ``[B, N, d]`` features to compare (L2-normalised here).
        mergeable: ``[B, N]`` bool; a token that is False is never merged nor merged into
            (protected tokens and padding).
        r: edges to keep per sample (int, or ``[B]`` tensor).
        threshold: keep instead every edge whose similarity exceeds it (DToMe).

    Returns:
        ``[B, N]`` long: ``target[b, i] = i`` for kept tokens, the B token's index otherwise.
    """
    b, n, _ = metric.shape
    a, _, _, _ = split(mergeable)
    node_max, dest = best_edges(metric, mergeable)
    n_a = node_max.shape[1]
    merge = node_max > -torch.inf
    if threshold is not None:
        merge &= node_max > threshold
    if not (isinstance(r, int) and r >= n_a):
        order = node_max.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(n_a, device=metric.device).expand_as(order)
        )
        r_t = torch.as_tensor(r, device=metric.device).reshape(-1, 1)
        merge &= rank < r_t
    target = torch.arange(n, device=metric.device).repeat(b, 1)
    return target.scatter(1, a, torch.where(merge, dest, a))
