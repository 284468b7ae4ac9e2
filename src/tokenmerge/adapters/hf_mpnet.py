"""Hugging Face MPNet encoders: ``MPNetModel``, ``MPNetForSequenceClassification`` and
``MPNetForMultipleChoice`` (``eager`` attention, the only kind transformers implements for
MPNet), and sentence-transformers models over them (all-mpnet-base-v2).

MPNet (Song et al. 2020, "MPNet: Masked and Permuted Pre-training for Language
Understanding") is a post-LN BERT-style encoder whose self-attention adds a learned relative
position bias, one per head, shared by every layer (T5's buckets)::

    A = softmax(Q K^T / sqrt(d) + B + M),    B[h, i, j] = E[bucket(p_j - p_i), h]

``p_i`` is the position of token ``i``, ``E`` is ``encoder.relative_attention_bias`` and
``bucket`` (``MPNetEncoder.relative_position_bucket``) gives each direction 16 buckets: one
per distance below 8, then logarithmic up to 128. ``M`` is the padding mask. The encoder
computes ``B`` once for its ``N`` input tokens and hands it to every layer.

After a reduction the current tokens no longer stand at ``0..N'-1``: token ``i`` stands at
``p_i``, the original index of its representative (``TokenState.pos``). Every later layer gets
``B[:, :, p_i, p_j]``, gathered from the ``N x N`` bias the encoder handed it: the model's own
bucket function at the original positions, the very values the model computed. Recomputing
the buckets would copy the model's code and could land in a neighbouring bucket where a
float rounding of the logarithm differs. Until the first reduction each layer gets the bias
as the encoder passed it, so a zero budget is bit-identical.

Everything else (padding, protected special tokens, per-sequence budgets, size-weighted
pooling, sentence-transformers) is as for the BERT family: :mod:`.hf_text`.

Signals: keys (ToMe's metric) and queries are the outputs of ``attn.k``/``attn.q``; a method
that asks for attention probabilities gets ``softmax(Q K^T / sqrt(d) + M)``, without ``B``
(a content-only approximation of the layer's attention).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import BlockCall, BlockSpec, framework_versions
from .hf_text import TextFamily, register_family

__all__ = ["SPEC", "pairs_at"]


def pairs_at(bias: Tensor, pos: Tensor) -> Tensor:
    """``bias[b, h, pos[b, i], pos[b, j]]``: a pairwise term over the original tokens
    (``[B or 1, H, N0, N0]``) at the current tokens' original positions (``[B, N]``), as
    ``[B, H, N, N]``."""
    b, n = pos.shape
    bias = bias.expand(b, -1, -1, -1)
    h, n0 = bias.shape[1], bias.shape[-1]
    rows = bias.gather(2, pos[:, None, :, None].expand(b, h, n, n0))
    return rows.gather(3, pos[:, None, None, :].expand(b, h, n, n))


def _position_bias(call: BlockCall) -> Tensor:
    """The relative position bias the encoder handed this layer:
    ``MPNetLayer(hidden_states, attention_mask, position_bias, ...)``."""
    bias = call.args[1] if len(call.args) > 1 else call.kwargs.get("position_bias")
    if not isinstance(bias, Tensor) or bias.dim() != 4:
        raise RuntimeError(
            "tokenmerge (hf-mpnet): MPNetEncoder did not hand its layer a [B, H, N, N] "
            f"position_bias (got {type(bias).__name__}); this transformers version calls MPNet "
            f"differently and is not handled (installed: {framework_versions()})"
        )
    return bias


def _attn(m: nn.Module, x: Tensor, mask: Tensor | None, call: BlockCall) -> Tensor:
    """``LN(x + SelfAttention(x))`` with the relative bias at the tokens' original positions."""
    if call.kwargs.get("output_attentions"):
        raise ValueError(
            "tokenmerge (hf-mpnet): output_attentions=True is not supported on a patched MPNet "
            "(its layers return only the hidden states); call tokenmerge.remove(model) first"
        )
    bias = _position_bias(call)
    if call.pos is not None:
        bias = pairs_at(bias, call.pos)
    return m.attention(x, mask, position_bias=bias)[0]


#: ``MPNetLayer``: LN(x + Attention(x, B)), then LN(h + FFN(h)) (post-LN, like BERT).
SPEC = BlockSpec(
    attn=_attn,
    mlp=lambda m, h: m.output(m.intermediate(h), h),
    q=lambda m: m.attention.attn.q,
    k=lambda m: m.attention.attn.k,
    heads=lambda m: m.attention.attn.num_attention_heads,
    scale=lambda m: m.attention.attn.attention_head_size**-0.5,
    post_norm=True,
    returns_tuple=True,
    positions=True,
)


register_family(
    TextFamily(
        "hf-mpnet",
        "MPNet",
        "MPNetLayer",
        SPEC,
        heads=("ForSequenceClassification", "ForMultipleChoice"),
    )
)
