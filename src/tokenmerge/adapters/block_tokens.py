"""What a patched block does with its tokens, besides the reduction itself: the caller's mask,
the dense-output grid, padding left by dynamic methods, and the captured keys and queries.

Helpers of :mod:`.patch` (the engine), kept apart so that the engine reads as the block's
control flow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.reduction import Reduction
from ..core.state import TokenState
from .base import BlockSpec, ContextSlot


def mlp_on_real_tokens(spec: BlockSpec, block: nn.Module, h: Tensor, st: TokenState) -> Tensor:
    """The block's MLP branch, run on the real tokens only when a dynamic method left padding.

    The MLP is token-wise, so packing the real tokens of the batch into one row gives the same
    values while the padding slots (a batch padded to its widest sample) cost nothing: they get
    a zero branch (``post_norm``: their input back). Not in training, where drop path is per
    sample."""
    if st.uniform or block.training:
        return spec.mlp(block, h)
    valid = st.valid.flatten()
    if bool(valid.all()):
        return spec.mlp(block, h)
    flat = h.reshape(-1, h.shape[-1])
    idx = valid.nonzero().squeeze(1)
    real = spec.mlp(block, flat.index_select(0, idx).unsqueeze(0)).squeeze(0)
    out = flat.clone() if spec.post_norm else torch.zeros_like(flat)
    return out.index_copy_(0, idx, real.to(out.dtype)).view_as(h)


def callers_mask(args: tuple, kwargs: dict) -> Tensor | None:
    """The attention mask a block was called with (HF: ``attention_mask``, timm: ``attn_mask``)."""
    return args[0] if args else kwargs.get("attention_mask", kwargs.get("attn_mask"))


def refuse_custom_mask(args: tuple, kwargs: dict) -> None:
    """Merged tokens cannot follow a caller's own attention mask or causal attention."""
    if callers_mask(args, kwargs) is not None or kwargs.get("is_causal"):
        raise ValueError(
            "tokenmerge: this vision model was called with its own attention mask (attn_mask="
            "/attention_mask=) or is_causal=True; a mask over the original tokens cannot follow "
            "merged or pruned ones. Call it without a mask, or tm.remove(model) first"
        )


def from_grid(st: TokenState, x: Tensor, i: int) -> Tensor:
    """Dense mode: the current tokens, read back from the full grid at their representatives
    (exact: a representative's grid slot holds its own token's value)."""
    if x.shape[1] != st.n_orig:
        raise RuntimeError(
            f"tokenmerge (dense outputs): block {i} received {x.shape[1]} tokens, not the full "
            f"grid of {st.n_orig} the previous block handed on"
        )
    return x.gather(1, st.pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def to_grid(st: TokenState, y: Tensor, grid_in: Tensor) -> Tensor:
    """Dense mode: spread the block's output over the full grid (tomesd's unmerge); a token that
    was pruned (it sends mass nowhere) keeps the value it had when it entered this block."""
    lost = st.source.weight.sum(-1) <= 0
    return torch.where(lost.unsqueeze(-1), grid_in, st.unmerge(y))


def empty_reduction(n_in: int, n_out: int, device: torch.device) -> Reduction:
    """A selection for an empty batch: ``[0, n_in] -> [0, n_out]``."""
    return Reduction(
        index=torch.zeros(0, n_in, 1, dtype=torch.long, device=device),
        weight=torch.zeros(0, n_in, 1, device=device),
        rep=torch.zeros(0, n_out, dtype=torch.long, device=device),
        selection=True,
        uniform=True,
    )


def capture(slot: ContextSlot, name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        cap = slot.get()
        if cap is not None:
            cap[name] = output

    return hook


def drop_padding(st: TokenState, h: Tensor) -> Tensor:
    """Remove padding slots (size 0) that make the batch wider than its longest sequence."""
    valid = st.valid
    n = valid.shape[1]
    if int(valid.sum(1).max()) == n:
        return h
    ar = torch.arange(n, device=valid.device).expand_as(valid)
    return st.reduce(h, Reduction.from_targets(torch.where(valid, ar, -1)))


def split_heads(t: Tensor, layout: str, heads: int, part: int = 1) -> Tensor:
    """``[B, H, N, d]`` from a captured projection; ``part`` picks q (0) or k (1) of a fused
    ``"qkv"`` one."""
    if layout == "bhnd":
        return t
    b, n, c = t.shape
    if layout == "qkv":
        return t.view(b, n, 3, heads, c // (3 * heads))[:, :, part].transpose(1, 2)
    return t.view(b, n, heads, c // heads).transpose(1, 2)
