"""Hugging Face ModernBERT encoders: ``ModernBertModel`` and
``ModernBertForSequenceClassification`` with ``classifier_pooling="cls"`` (``sdpa`` and
``eager`` attention), and sentence-transformers models over them.

ModernBERT (Warner et al. 2024, "Smarter, Better, Faster, Longer: A Modern Bidirectional
Encoder for Fast, Memory Efficient, and Long Context Finetuning and Inference") is a pre-LN
encoder (``x + Attn(LN(x))``, then ``h + GLU(LN(h))``) without position embeddings. Positions
enter every attention through rotary embeddings (RoPE), and its layers alternate between
global attention and local attention over a sliding window::

    q_i = R(p_i) W_q x_i,  k_j = R(p_j) W_k x_j,   R(p) rotates each pair of channels
                                                   (c, c + d/2) by the angle p * theta_c,
    theta_c = base^(-2c/d)    (base 160000 in global layers, 10000 in local ones)
    A = softmax(q k^T / sqrt(d) + M),   local layers: M[i, j] = -inf unless |p_i - p_j| <= w/2

where ``w`` is ``config.local_attention`` (128 in the released models) and ``w/2`` is
``config.sliding_window``: transformers' ``sliding_window_bidirectional_overlay`` keeps
``abs(q_idx - kv_idx) <= sliding_window``. Global layers are those with ``layer_types[l] ==
"full_attention"`` (every ``global_attn_every_n_layers``-th, layer 0 first).

After a reduction token ``i`` stands at ``p_i``, the original index of its representative
(``TokenState.pos``), and both position terms are evaluated there:

- **rotary**: each layer's ``cos``/``sin`` (computed by the model for the ``N`` original
  tokens, from its ``position_ids``) are gathered at ``p_i``: the angles of the kept tokens'
  original positions, the very values the model computed (custom ``position_ids`` included);
- **window**: a local layer's mask keeps ``|p_i - p_j| <= w/2`` and adds the engine's
  padding/size bias (``TokenState.attn_bias``: ``-inf`` on padding keys, ``log(size)`` with
  proportional attention). A padding query is exempt from the window, so that its row keeps a
  finite entry; its output is never used.

Until the first reduction every layer gets the model's own tables and masks, so a zero budget
is bit-identical. Padding, protected special tokens ([CLS]/[SEP] and the config's ids),
per-sequence budgets, pooling and sentence-transformers are as for the BERT family
(:mod:`.hf_text`).

Refused by name: ``flash_attention_2``/``flex_attention`` and every other kernel that cannot
take the window and the size bias as one float mask; heads with one output per token,
``ModernBertForMultipleChoice`` (it reads its CLS token at the first attended index of the
input's ``attention_mask``) and ``classifier_pooling="mean"`` (it averages over the original
tokens with that mask); a model whose layer 0 is local (the padding is read from layer 0's
mask, which must be a plain padding mask). Unpadded batches are not reachable: transformers 5
runs ModernBERT on padded ``[B, N]`` batches with a 4-D mask under ``sdpa`` and ``eager``
(only flash attention unpads, inside its kernel call, and it is refused).

Signals: keys (ToMe's metric) and queries are the ``q``/``k`` thirds of ``attn.Wqkv`` before
rotation (content, not position); a method that asks for attention probabilities gets
``softmax(q k^T / sqrt(d) + M)`` of those, over all tokens (no rotation, no window): a
content-only approximation of the layer's attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import BlockCall, BlockSpec, UnsupportedModelError, framework_versions
from .hf_text import TextFamily, register_family

__all__ = ["SPEC", "rows_at", "window_bias"]

_LAYER_TYPES = ("full_attention", "sliding_attention")


def rows_at(t: Tensor, pos: Tensor) -> Tensor:
    """``t[b, pos[b, i]]``: a per-token table over the original tokens (``[B or 1, N0, d]``,
    e.g. rotary ``cos``/``sin``) at the current tokens' original positions, ``[B, N, d]``."""
    b, n = pos.shape
    return t.expand(b, -1, -1).gather(1, pos[..., None].expand(b, n, t.shape[-1]))


def window_bias(pos: Tensor, half: int, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The additive mask of a local layer, ``[B, 1, N, N]``: ``bias`` (``[B, 1, 1, N]`` or
    ``None``) where ``|pos_i - pos_j| <= half``, ``-inf`` elsewhere; rows of padding queries
    (``-inf`` keys in ``bias``) keep ``bias`` alone."""
    b, n = pos.shape
    near = (pos[:, :, None] - pos[:, None, :]).abs() <= half  # [B, N, N]
    if bias is None:
        full = torch.zeros(b, 1, n, n, dtype=dtype, device=pos.device)
    else:
        near = near | ~bias[:, 0, 0].isfinite()[:, :, None]  # padding query rows
        full = bias.expand(b, 1, n, n)
    return full.masked_fill(~near[:, None], -math.inf)


def _rotary(call: BlockCall) -> tuple[Tensor, Tensor]:
    """The ``(cos, sin)`` the model handed this layer: ``layer(x, attention_mask=...,
    position_embeddings=(cos, sin))``."""
    pe = call.kwargs.get("position_embeddings")
    if pe is None and len(call.args) > 1:
        pe = call.args[1]
    if not (isinstance(pe, tuple) and len(pe) == 2 and all(isinstance(t, Tensor) for t in pe)):
        raise RuntimeError(
            "tokenmerge (hf-modernbert): ModernBertModel did not hand its layer "
            f"position_embeddings=(cos, sin) (got {type(pe).__name__}); this transformers "
            f"version calls ModernBERT differently and is not handled ({framework_versions()})"
        )
    return pe


def _attn(m: nn.Module, x: Tensor, mask: Tensor | None, call: BlockCall) -> Tensor:
    """``Attn(LN(x))`` with rotary angles and the local window at the original positions."""
    pe = _rotary(call)
    rest = {
        k: v for k, v in call.kwargs.items() if k not in ("attention_mask", "position_embeddings")
    }
    if call.pos is not None:
        pe = (rows_at(pe[0], call.pos), rows_at(pe[1], call.pos))
        if m.attention_type == "sliding_attention":
            mask = window_bias(call.pos, m.config.sliding_window, mask, x.dtype)
    return m.attn(m.attn_norm(x), position_embeddings=pe, attention_mask=mask, **rest)[0]


#: ``ModernBertEncoderLayer``: x + Attn(LN(x)) with rotary q/k, then h + GLU(LN(h)).
SPEC = BlockSpec(
    attn=_attn,
    mlp=lambda m, h: m.mlp(m.mlp_norm(h)),
    q=lambda m: m.attn.Wqkv,
    k=lambda m: m.attn.Wqkv,
    heads=lambda m: m.attn.Wqkv.out_features // (3 * m.attn.head_dim),
    scale=lambda m: m.attn.head_dim**-0.5,
    layout="qkv",
    positions=True,
)


def _check(model: nn.Module, base: nn.Module) -> None:
    """Layer types the spec knows, a global layer 0, and CLS pooling in the heads."""
    cfg = base.config
    types = list(getattr(cfg, "layer_types", None) or ())
    bad = sorted({t for t in types if t not in _LAYER_TYPES})
    if not types or bad:
        raise UnsupportedModelError(
            f"hf-modernbert: layer types {bad or types} are not supported; accepted: "
            f"{', '.join(_LAYER_TYPES)}"
        )
    if types[0] != "full_attention":
        raise UnsupportedModelError(
            "hf-modernbert: layer 0 is a local (sliding_attention) layer; tokenmerge reads the "
            "padding from layer 0's mask and needs a full_attention layer there (as in every "
            "released ModernBERT)"
        )
    pooling = getattr(model.config, "classifier_pooling", "cls")
    if model is not base and pooling != "cls":
        raise UnsupportedModelError(
            f"hf-modernbert: {type(model).__name__} with classifier_pooling={pooling!r} averages "
            "the output over the input's attention_mask, which merged tokens cannot follow; "
            "accepted: classifier_pooling='cls', or the base ModernBertModel with "
            "tokenmerge.adapters.hf_text.mean_pool"
        )


register_family(
    TextFamily(
        "hf-modernbert",
        "ModernBert",
        "ModernBertEncoderLayer",
        SPEC,
        blocks="layers",
        heads=("ForSequenceClassification",),
        check=_check,
        mlp_mats=3,  # GLU: Wi is d -> 2f, Wo is f -> d
    )
)
