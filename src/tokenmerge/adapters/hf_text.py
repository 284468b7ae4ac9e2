"""Hugging Face BERT-family text encoders, and sentence-transformers models built on them.

Families (``sdpa`` and ``eager`` attention): BERT (MiniLM, BGE, E5 and most sentence encoders
are ``BertModel``), RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ERNIE, Data2VecText (all of them
post-LN ``*Layer`` blocks with ``attention.self.{query,key}``), and DistilBERT
(``TransformerBlock``). Every model class of a family is accepted whose output is per sequence
(the base ``*Model``, ``*ForSequenceClassification``, ``*ForMultipleChoice``,
``*ForNextSentencePrediction``); heads that need one output per input token, decoders and
cross-attention are refused by name, and so are BERT-like encoders whose blocks differ
(DeBERTa, ALBERT, RoFormer, ...).

Two position-aware families live in their own modules and register here
(:func:`register_family`), so that everything below, sentence-transformers included, applies
to them: MPNet (:mod:`.hf_mpnet`: relative position bias) and ModernBERT
(:mod:`.hf_modernbert`: rotary positions, local attention). Their attention is evaluated at
the kept tokens' original positions.

How text differs from images:

- **Padding.** The model's ``attention_mask`` is recorded at the encoder's entry; padding
  starts with size 0, so it is never merged and nothing is merged into it. After each
  reduction the padding slots are dropped (``Target.compact_padding``): the batch narrows to
  its longest remaining sequence.
- **Masks.** Until the first reduction every layer gets the model's own mask (a 4-D boolean
  mask for ``sdpa``, an additive float mask for ``eager``, or ``None``), so a zero budget is
  bit-identical. From then on it gets ``[B, 1, 1, N]`` floats: ``log(size)`` for real tokens
  (proportional attention; 0 with ``prop_attn=False``) and ``-inf`` for padding. Both
  attention implementations add it to the logits, and SDPA stays fused. Proportional
  attention is *off* by default for this family: on MiniLM at a keep ratio of 0.9 per layer
  it lowers the embedding cosine of 256–512-token documents from 0.956 to 0.922 (5th
  percentile 0.926 to 0.859) and leaves tweets unchanged (0.938 either way).
- **Special tokens.** Protected: the first and the last real token of every sequence ([CLS]
  and [SEP], ``<s>`` and ``</s>``), every token of a sequence that has the same id as one of
  those two (the middle [SEP] of a sentence pair), and every id the model's config names
  (pad/bos/eos/sep/cls); a sentence-transformers model adds its tokenizer's special ids.
- **Budgets.** Each sequence of a padded batch gets the schedule of its own length
  (``KeepRatio`` is the natural text budget) and sequences shorter than ``min_tokens`` are not
  reduced at all.
- **Sizes at the output.** The encoder returns the merged tokens, ``[B, N', C]``;
  :func:`mean_pool` weights them by size (``tm.state(model).size``, 0 for padding).
  ``tm.state(model).unmerge(h)`` copies them back onto the input grid.
  A call with ``output_hidden_states`` runs dense: every block hands the full token grid on, so
  every hidden state, the output included, has the input's ``[B, N, C]`` layout.

A ``SentenceTransformer`` over any of these encoders: :mod:`.sentence_encoders`.

Positions need no care in the families defined here: they add absolute position embeddings
before the first block, so merged tokens carry their positions in their features.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.flops import CostModel
from .base import (
    ADAPTERS,
    ATTR,
    Adapter,
    BlockSpec,
    Target,
    UnsupportedModelError,
    check_blocks,
    class_names,
)
from .patch import Patch

__all__ = ["HFText", "TextFamily", "mean_pool", "register_family"]


def _chunked(fn: Callable[[Tensor], Tensor], chunk: int, h: Tensor) -> Tensor:
    """``apply_chunking_to_forward`` along the tokens, or one call when the chunk size does
    not divide the (merged) token count; chunking only saves memory."""
    if chunk and h.shape[1] % chunk == 0 and h.shape[1] > chunk:
        return torch.cat([fn(c) for c in h.split(chunk, dim=1)], dim=1)
    return fn(h)


# BertLayer and its copies: LN(x + SelfOutput(SelfAttention(x))), then LN(h + FFN(h)).
_BERT = BlockSpec(
    attn=lambda m, x, mask: m.attention(x, mask)[0],
    mlp=lambda m, h: _chunked(m.feed_forward_chunk, m.chunk_size_feed_forward, h),
    q=lambda m: m.attention.self.query,
    k=lambda m: m.attention.self.key,
    heads=lambda m: m.attention.self.num_attention_heads,
    scale=lambda m: m.attention.self.scaling,
    post_norm=True,
)
# DistilBERT's TransformerBlock: sa_layer_norm(attn(x) + x), output_layer_norm(ffn(h) + h).
_DISTILBERT = BlockSpec(
    attn=lambda m, x, mask: m.sa_layer_norm(m.attention(x, attention_mask=mask)[0] + x),
    mlp=lambda m, h: m.output_layer_norm(
        _chunked(m.ffn.ff_chunk, m.ffn.chunk_size_feed_forward, h) + h
    ),
    q=lambda m: m.attention.q_lin,
    k=lambda m: m.attention.k_lin,
    heads=lambda m: m.attention.n_heads,
    scale=lambda m: m.attention.scaling,
    post_norm=True,
)


# Heads with one output per sequence; every other head is refused.
_SEQUENCE_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction")


@dataclass(frozen=True)
class TextFamily:
    """One text-encoder family: how to find and run its blocks.

    Attributes:
        name: the family's name (``Target.family``), e.g. ``"hf-bert"``.
        prefix: its model classes are ``<prefix>PreTrainedModel`` subclasses and its base
            model is ``<prefix>Model``.
        layer: the exact block class the spec was written for (any other is refused).
        spec: how to run one block.
        blocks: attribute path of the block list inside the base model.
        heads: the accepted heads (``<prefix><head>``), all with one output per sequence.
        check: further refusals for a model of this family, ``check(model, base)``: raises
            :class:`UnsupportedModelError` naming the problem and the accepted values.
        mlp_mats: weight matrices of the MLP (3 for a gated linear unit), for the FLOPs count.
    """

    name: str
    prefix: str
    layer: str
    spec: BlockSpec
    blocks: str = "encoder.layer"
    heads: tuple[str, ...] = _SEQUENCE_HEADS
    check: Callable[[nn.Module, nn.Module], None] | None = None
    mlp_mats: int = 2


_FAMILIES: list[TextFamily] = [
    TextFamily("hf-bert", "Bert", "BertLayer", _BERT),
    TextFamily("hf-roberta", "Roberta", "RobertaLayer", _BERT),
    TextFamily("hf-xlm-roberta", "XLMRoberta", "XLMRobertaLayer", _BERT),
    TextFamily("hf-camembert", "Camembert", "CamembertLayer", _BERT),
    TextFamily("hf-electra", "Electra", "ElectraLayer", _BERT),
    TextFamily("hf-ernie", "Ernie", "ErnieLayer", _BERT),
    TextFamily("hf-data2vec-text", "Data2VecText", "Data2VecTextLayer", _BERT),
    TextFamily("hf-distilbert", "DistilBert", "TransformerBlock", _DISTILBERT, "transformer.layer"),
]


def register_family(fam: TextFamily) -> None:
    """Add a text family (a module of its own, e.g. :mod:`.hf_mpnet`): :class:`HFText` and
    :class:`~.sentence_encoders.SentenceTransformers` then accept its models."""
    if any(f.prefix == fam.prefix for f in _FAMILIES):
        raise ValueError(f"a text family for {fam.prefix}PreTrainedModel is already registered")
    _FAMILIES.append(fam)


# BERT-like encoders whose blocks differ: refused by name rather than patched half-way.
_REFUSED = {
    "DebertaPreTrainedModel": "its disentangled attention needs relative positions per token",
    "DebertaV2PreTrainedModel": "its disentangled attention needs relative positions per token",
    "AlbertPreTrainedModel": "its layers are shared groups with a different structure",
    "XLMRobertaXLPreTrainedModel": "its layers are pre-LN",
    "MobileBertPreTrainedModel": "its layers are bottleneck stacks",
    "LongformerPreTrainedModel": "its sliding-window attention is position-dependent",
    "BigBirdPreTrainedModel": "its block-sparse attention is position-dependent",
    "RoFormerPreTrainedModel": "its rotary positions are applied inside attention",
    "FunnelPreTrainedModel": "it pools tokens itself",
}

_IMPLEMENTATIONS = ("sdpa", "eager")


def _family_of(model: nn.Module) -> TextFamily | None:
    names = class_names(model)
    for fam in _FAMILIES:
        if f"{fam.prefix}PreTrainedModel" in names:
            return fam
    return None


def _refusal(model: nn.Module) -> str | None:
    for name, why in _REFUSED.items():
        if name in class_names(model):
            return f"{type(model).__name__} is not supported: {why}"
    return None


def _check_model(model: nn.Module, fam: TextFamily) -> nn.Module:
    """Refuse, by name, a head, configuration or attention kernel we cannot merge under; return
    the base encoder (the module whose forward receives ``input_ids``/``attention_mask``)."""
    cls = type(model).__name__
    cfg = model.config
    is_base = cls.endswith("Model") and not cls.endswith("PreTrainedModel")
    if not is_base and not cls.endswith(fam.heads):
        raise UnsupportedModelError(
            f"{fam.name}: {cls} needs one output per input token (or decodes, or reads the "
            "original token grid); tokenmerge "
            f"merges tokens only for per-sequence outputs: the base {fam.prefix}Model or "
            f"{', '.join(fam.prefix + h for h in fam.heads)}"
        )
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{fam.name}: {cls} is configured as a decoder (is_decoder/add_cross_attention); "
            "only bidirectional encoders are supported"
        )
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in _IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"{fam.name}: attention implementation {impl!r} is not supported (it cannot take "
            f"the size bias as a float mask); load the model with attn_implementation in "
            f"{_IMPLEMENTATIONS}"
        )
    base = model.base_model
    if type(base).__name__ != f"{fam.prefix}Model":
        raise UnsupportedModelError(
            f"{fam.name}: the base model of {cls} is a {type(base).__name__}, not a "
            f"{fam.prefix}Model"
        )
    if fam.check is not None:
        fam.check(model, base)
    return base


def _find_blocks(base: nn.Module, fam: TextFamily) -> list[nn.Module]:
    """The encoder's layers (``fam.blocks``: ``encoder.layer`` for the BERT copies,
    ``transformer.layer`` for DistilBERT); every one must be exactly the class the spec was
    written for."""
    layers: Any = base
    for attr in fam.blocks.split("."):
        layers = getattr(layers, attr, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"{fam.name}: no list of {fam.layer} found in the model")
    blocks = list(layers)
    check_blocks(blocks, fam.layer, fam.name)
    return blocks


def _cost(fam: TextFamily, cfg: Any, depth: int) -> CostModel:
    if fam.name == "hf-distilbert":
        return CostModel(depth=depth, dim=cfg.dim, mlp_dim=cfg.hidden_dim)
    return CostModel(
        depth=depth, dim=cfg.hidden_size, mlp_dim=cfg.intermediate_size, mlp_mats=fam.mlp_mats
    )


def _config_special_ids(cfg: Any) -> set[int]:
    ids = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            ids.add(v)
    return ids


def _key_padding(mask: Any, b: int, n: int, device: torch.device, family: str) -> Tensor:
    """Which keys are real (``[B, N]`` bool), read from the mask the first block receives.

    That mask is what the model itself attends with: ``None`` (no padding), a boolean
    ``[B, 1, Q, K]`` (``sdpa``: True attends) or an additive float one (``eager``: the dtype's
    minimum masks). Anything other than a key-padding mask (packed sequences, custom 3-D/4-D
    masks) is refused: merged tokens could not follow it.
    """
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 3, 4):
        kind = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"tokenmerge ({family}): unsupported attention mask {kind}")
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.dim() == 2:  # a raw padding mask: 1 attends
        allowed = mask != 0
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    if allowed.dim() == 2:
        allowed = allowed[:, None, :]
    elif allowed.dim() == 4:
        allowed = allowed.all(1)  # over heads (size 1 in these models)
    allowed = allowed.to(device).expand(b, -1, n)  # [B, Q or 1, K]
    valid = allowed.any(1)
    # every real query must see exactly the real keys (padded queries do not matter)
    if not bool(((allowed == valid[:, None, :]) | ~valid[:, :, None]).all()):
        raise ValueError(
            f"tokenmerge ({family}): the attention mask is not a padding mask (a real token "
            "does not see every other real token); custom 3-D/4-D masks and packed sequences "
            "cannot be combined with merged tokens"
        )
    return valid


def _record_first(
    slot: str, arg: int, names: tuple[str, ...], rec: contextvars.ContextVar
) -> Callable[[Patch], Callable[..., None]]:
    """Pre-hook factory storing one argument of a module's call (positional ``arg`` or one of
    the keywords ``names``) in ``rec[slot]``: the forward being run, never a stale one."""

    def factory(patch: Patch) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            value = (
                args[arg]
                if len(args) > arg
                else next((kwargs[k] for k in names if k in kwargs), None)
            )
            got = dict(rec.get() or {}) if slot != "ids" else {}
            got[slot] = value
            rec.set(got)

        return hook

    return factory


def _make_init(
    rec: contextvars.ContextVar, special: set[int], family: str
) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
    """``init(x, inputs)`` for the patch engine: protected tokens and initial sizes (0 = pad),
    from the input ids and layer mask recorded by the pre-hooks in ``rec``."""
    special_t = torch.tensor(sorted(special), dtype=torch.long) if special else None

    def init(x: Tensor) -> tuple[Tensor, Tensor | None]:
        b, n, _ = x.shape
        got = rec.get() or {}
        valid = _key_padding(got.get("mask"), b, n, x.device, family)
        ids = got.get("ids")
        ar = torch.arange(n, device=x.device)
        first = torch.where(valid, ar, n).amin(1, keepdim=True)
        last = torch.where(valid, ar, -1).amax(1, keepdim=True)
        protected = (ar == first) | (ar == last)
        if isinstance(ids, Tensor) and tuple(ids.shape) == (b, n):
            ids = ids.to(x.device)
            # ids equal to this sequence's own first/last token: [CLS]/[SEP] (the middle [SEP]
            # of a pair), whatever the vocabulary; per sequence, so batches stay independent
            protected |= ids == ids.gather(1, first.clamp_max(n - 1))
            protected |= ids == ids.gather(1, last.clamp_min(0))
            if special_t is not None:
                protected |= torch.isin(ids, special_t.to(ids.device))
        protected &= valid
        size = None if bool(valid.all()) else valid.to(torch.float32)
        return protected, size

    return init


def _text_target(
    model: nn.Module, fam: TextFamily, extra_special: set[int] = frozenset()
) -> Target:
    base = _check_model(model, fam)
    blocks = _find_blocks(base, fam)
    # The input ids and the padding are read where the model itself passes them (its
    # embeddings, its first block), not at its entry: sentence-transformers calls
    # ``model.forward`` directly, which skips hooks on the model.
    rec: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
        f"tokenmerge_text_{id(base)}", default=None
    )
    return Target(
        family=fam.name,
        blocks=blocks,
        spec=fam.spec,
        cost=_cost(fam, base.config, len(blocks)),
        n_prefix=1,
        prop_attn=False,  # measured on MiniLM: +log(size) costs cosine (module docstring)
        init=_make_init(rec, _config_special_ids(base.config) | set(extra_special), fam.name),
        entry=base,
        pre_hooks=[
            (base.embeddings, _record_first("ids", 0, ("input_ids",), rec)),
            (blocks[0], _record_first("mask", 1, ("attention_mask",), rec)),
        ],
        compact_padding=True,
    )


class HFText(Adapter):
    """Hugging Face BERT-family encoders (see the module docstring)."""

    family = "hf-text"
    description = (
        "transformers BERT (MiniLM), RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ERNIE, "
        "Data2VecText, DistilBERT encoders (base model or sequence-level heads; sdpa/eager), "
        "MPNet (relative position bias; eager) and ModernBERT (rotary, local attention; "
        "sdpa/eager)"
    )

    def matches(self, model: nn.Module) -> bool:
        return _family_of(model) is not None or _refusal(model) is not None

    def target(self, model: nn.Module) -> Target:
        why = _refusal(model)
        if why is not None:
            raise UnsupportedModelError(f"{self.family}: {why}")
        fam = _family_of(model)
        assert fam is not None
        return _text_target(model, fam)


ADAPTERS.append(HFText())


# --------------------------------------------------------------------------------------------
# Pooling over merged tokens
# --------------------------------------------------------------------------------------------


def mean_pool(model: nn.Module, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean of an encoder's output tokens ``hidden`` (``[B, N, C]``), weighted by size.

    When ``model`` is patched and ``hidden`` comes from its latest forward in this thread, the
    weights are the merged tokens' sizes (0 for padding), so the result equals the mean over
    the original tokens each merged token stands for. Otherwise (unpatched, or no reduction
    happened) the weights are ``attention_mask`` (all ones if ``None``): the usual masked mean.
    """
    weights = None
    patch = getattr(model, ATTR, None)
    st = patch.state if patch is not None else None
    if st is not None and tuple(st.pos.shape) == tuple(hidden.shape[:2]):
        weights = st.sizes(hidden.dtype)  # ones when nothing was padded nor merged
    elif attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match the hidden states "
                f"{tuple(hidden.shape[:2])}, and they are not the patched model's latest output"
            )
        weights = attention_mask.to(hidden.dtype)
    if weights is None:
        return hidden.mean(1)
    w = weights.unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)
