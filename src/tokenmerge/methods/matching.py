"""Bipartite soft matching, shared by ToMe and the methods built on it."""

from __future__ import annotations

import torch
from torch import Tensor


def unit(x: Tensor) -> Tensor:
    """``x`` scaled to unit L2 norm along the last axis (cosine similarity by dot product)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def best_edges(metric: Tensor, mergeable: Tensor) -> tuple[Tensor, Tensor]:
    """Each A token's (even position) most similar B token (odd position): ToMe's
    ``node_max`` and ``node_idx``, ``[B, ⌈N/2⌉]``; ``-inf`` where the A token or every B token
    is not mergeable."""
    m = unit(metric)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
    blocked = ~mergeable[:, 0::2, None] | ~mergeable[:, None, 1::2]
    return scores.masked_fill(blocked, -torch.inf).max(-1)


def bipartite_targets(
    metric: Tensor,
    mergeable: Tensor,
    r: int | Tensor,
    threshold: Tensor | float | None = None,
) -> Tensor:
    """ToMe's bipartite soft matching, as merge targets for :meth:`Reduction.from_targets`.

    Tokens alternate into sets A (even positions) and B (odd positions). Every A token draws
    an edge to its most similar B token (cosine of ``metric``); the ``r`` strongest edges are
    kept (or, with ``threshold``, every edge above it), and each kept edge merges its A token
    into its B token.

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
    node_max, node_idx = best_edges(metric, mergeable)
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
    even = target[:, 0::2]
    target[:, 0::2] = torch.where(merge, 2 * node_idx + 1, even)
    return target
