"""Tensor helpers of the decoder runtime: RoPE projections, sequence gathers, argument reads."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _project_raw(attn: nn.Module, proj: str, h: Tensor) -> Tensor:
    """Queries or keys of ``attn`` for hidden states ``h`` ``[B, n, C]`` before RoPE:
    ``[B, heads, n, d]`` (q/k-norm applied when the family has it)."""
    b, n, _ = h.shape
    x = getattr(attn, f"{proj}_proj")(h).view(b, n, -1, attn.head_dim)
    norm = getattr(attn, f"{proj}_norm", None)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def _project(attn: nn.Module, proj: str, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`_project_raw`, rotated: post-RoPE ``[B, heads, n, d]``."""
    x = _project_raw(attn, proj, h)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _left_align(valid: Tensor) -> Tensor:
    """Permutation ``[B, n]`` that moves the valid slots (in order) to the right end."""
    n = valid.shape[1]
    ar = torch.arange(n, device=valid.device)
    return (valid.long() * n + ar).argsort(dim=1)


def _gather_seq(t: Tensor, sel: Tensor) -> Tensor:
    """Gather ``t`` ``[1 or B, N, ...]`` along dim 1 with ``sel`` ``[B, n]``."""
    t = t.expand(sel.shape[0], *t.shape[1:])
    idx = sel.reshape(*sel.shape, *([1] * (t.dim() - 2))).expand(*sel.shape, *t.shape[2:])
    return t.gather(1, idx)


def _window_of(attn: nn.Module, config: Any) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if type(attn).__name__ == "MistralAttention":
        return getattr(config, "sliding_window", None)
    return None


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _is_zero(value: Any) -> bool:
    """``logits_to_keep`` is its default (keep every position)."""
    if value is None:
        return True
    if isinstance(value, Tensor):
        return False  # explicit positions
    return int(value) == 0
