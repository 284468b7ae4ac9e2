"""An independent check of the perplexity of a compressed cache.

The benchmark scores a continuation on the compressed cache with the patched model (the
adapter's masks, positions and bookkeeping). Here the *unpatched* model runs the whole
sequence ``prefill + continuation`` in one forward through a custom attention function
(:data:`IMPL`, registered with transformers' ``AttentionInterface``) that applies, per layer
and KV head, the mask the compression implies: prefill queries see the causal prefill (the
prefill itself is exact: each layer is compressed after its attention), continuation queries
see only the prefill entries the cache kept at that layer and head, plus the continuation
causally. Both must give the same NLL up to floating-point rounding.

Only models whose every layer attends to the whole sequence (no sliding window, no logit
soft-capping) are supported: the benchmark's Llama and Qwen2 models.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface

from .measure import nll_of

#: the attention implementation name registered for the check
IMPL = "tokenmerge_kept_mask"
#: (prefill length, {layer: [B, H_kv, P] bool kept}) of the forward being checked
_KEPT: contextvars.ContextVar[tuple[int, dict[int, Tensor]] | None] = contextvars.ContextVar(
    "tokenmerge_kept", default=None
)


def _kept_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    block: int = 512,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Eager attention under the kept-entries mask of :data:`_KEPT` (see the module doc),
    ``block`` queries at a time (bounded memory at long contexts), in float32."""
    state = _KEPT.get()
    if state is None:
        raise RuntimeError(f"the {IMPL!r} attention runs only inside check.reference_nll")
    prefill, kept = state
    b, h, t, d = query.shape
    hk = key.shape[1]
    g = h // hk
    scale = scaling if scaling is not None else d**-0.5
    q = query.float().view(b, hk, g, t, d)
    k, v = key.float(), value.float()
    col = torch.arange(t, device=q.device)
    vis = None
    if (keep := kept.get(module.layer_idx)) is not None:
        # columns a continuation query may see: kept prefill entries and the continuation
        vis = torch.ones(b, hk, t, dtype=torch.bool, device=q.device)
        vis[..., :prefill] = keep.to(q.device)
    out = q.new_empty(b, hk, g, t, d)
    for s in range(0, t, block):
        e = min(s + block, t)  # keys after the block's last query are in every row's future
        row = col[s:e]
        logits = torch.einsum("bkgmd,bknd->bkgmn", q[:, :, :, s:e], k[:, :, :e]) * scale
        allowed = (col[None, :e] <= row[:, None]).expand(b, hk, e - s, e)
        if vis is not None:
            allowed = allowed & (vis[:, :, None, :e] | (row < prefill)[None, None, :, None])
        logits = logits.masked_fill(~allowed[:, :, None], -math.inf)
        out[:, :, :, s:e] = torch.softmax(logits, -1) @ v[:, :, None, :e]
    return out.view(b, h, t, d).transpose(1, 2).contiguous().to(query.dtype), None


AttentionInterface.register(IMPL, _kept_attention)


def kept_mask(cache: Any, prefill: int) -> dict[int, Tensor]:
    """``{layer: [B, H_kv, prefill] bool}``: the prefill entries a compressed cache kept at
    each reduced layer (``cache.index``, ``-1`` = empty slot); other layers keep everything."""
    out = {}
    for layer, idx in getattr(cache, "index", {}).items():
        if idx.numel() and int(idx.max()) >= prefill:
            raise ValueError(f"layer {layer} keeps entries beyond the prefill ({prefill} tokens)")
        hit = torch.zeros(*idx.shape[:2], prefill, dtype=torch.int32, device=idx.device)
        hit.scatter_add_(2, idx.clamp_min(0), (idx >= 0).to(torch.int32))
        out[layer] = hit > 0
    return out


def kept_fraction(cache: Any, prefill: int, depth: int) -> float:
    """Fraction of the ``prefill`` entries of every layer and KV head that ``cache`` holds
    (the method's budget, whatever the storage: heads that keep different numbers pad their
    layer's slots, which :func:`~tokenmerge.adapters.hf_decoder.kv_bytes` counts)."""
    kept = kept_mask(cache, prefill)
    whole = depth - len(kept)
    return (sum(float(m.float().mean()) for m in kept.values()) + whole) / depth


@contextmanager
def _implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name``, restored afterwards."""
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def check_supported(model: nn.Module) -> None:
    """Raise for models whose attention the check does not reproduce."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        sliding = set(types) != {"full_attention"}
    else:
        sliding = bool(getattr(cfg, "sliding_window", None)) and getattr(
            cfg, "use_sliding_window", True
        )
    if sliding:
        raise ValueError("the perplexity check supports full-attention models only")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ValueError("the perplexity check does not reproduce logit soft-capping")


@torch.inference_mode()
def reference_nll(
    model: nn.Module,
    tokens: Tensor,
    prefill: int,
    kept: dict[int, Tensor],
    score_from: int,
) -> tuple[float, int]:
    """NLL of ``tokens[0, score_from + 1:]`` from one forward of the unpatched ``model`` over
    ``tokens`` (``[1, T]``) under the kept-entries mask: the first ``prefill`` tokens are the
    compressed prefill, ``kept`` what :func:`kept_mask` read from its cache (``{}``: the
    uncompressed model)."""
    t = tokens.shape[1]
    token = _KEPT.set((prefill, kept))
    try:
        with _implementation(model, IMPL):
            logits = model(input_ids=tokens, use_cache=False, logits_to_keep=t - score_from).logits
    finally:
        _KEPT.reset(token)
    return nll_of(logits[0, :-1], tokens[0, score_from + 1 :])
