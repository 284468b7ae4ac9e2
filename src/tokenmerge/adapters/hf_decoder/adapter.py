"""The hf-decoder adapter: which models it patches, and where its hooks go."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...core.flops import CostModel
from ..base import ADAPTERS, Adapter, Target, UnsupportedModelError
from .runtime import _Runtime

#: model class -> (decoder layer class, attention class)
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention"),
    "LlamaModel": ("LlamaDecoderLayer", "LlamaAttention"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention"),
    "Qwen2Model": ("Qwen2DecoderLayer", "Qwen2Attention"),
    "Qwen3ForCausalLM": ("Qwen3DecoderLayer", "Qwen3Attention"),
    "Qwen3Model": ("Qwen3DecoderLayer", "Qwen3Attention"),
    "MistralForCausalLM": ("MistralDecoderLayer", "MistralAttention"),
    "MistralModel": ("MistralDecoderLayer", "MistralAttention"),
    "Gemma3ForCausalLM": ("Gemma3DecoderLayer", "Gemma3Attention"),
    "Gemma3TextModel": ("Gemma3DecoderLayer", "Gemma3Attention"),
}
#: attention implementations whose mask format the adapter writes
IMPLEMENTATIONS = ("sdpa", "eager")
ATTR = "_tokenmerge_decoder"


def _inner(model: nn.Module) -> nn.Module:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return model.model
    return model


class DecoderAdapter(Adapter):
    """Llama-family decoder LLMs from transformers (KV-cache and layer-K sites)."""

    family = "hf-decoder"
    description = (
        "transformers decoder LLMs (" + ", ".join(sorted(SUPPORTED)) + "); sites kv, decoder"
    )
    sites = frozenset({"kv", "decoder"})

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in SUPPORTED

    def target(self, model: nn.Module) -> Target:
        layer_cls, attn_cls = SUPPORTED[type(model).__name__]
        return decoder_target(self.family, model, _inner(model), layer_cls, attn_cls, _Runtime)[0]


def decoder_target(
    family: str,
    model: nn.Module,
    inner: nn.Module,
    layer_cls: str,
    attn_cls: str,
    runtime: Callable[[nn.Module, nn.Module, list[nn.Module]], _Runtime],
) -> tuple[Target, _Runtime]:
    """The hooks of a decoder LLM ``inner`` (inside ``model``, which may be ``inner`` itself, a
    causal LM or a VLM around it), run by a ``runtime``; every layer must be exactly a
    ``layer_cls`` with an ``attn_cls``, or the model is refused by name. Returns the target and
    its runtime (to which a wrapping adapter may add hooks)."""
    name = type(model).__name__
    cfg = inner.config
    impl = cfg._attn_implementation
    if impl not in IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"{name} uses attn_implementation={impl!r}; the {family} adapter writes "
            f"masks for {', '.join(IMPLEMENTATIONS)} only (load the model with "
            "attn_implementation='sdpa')"
        )
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{name} with bidirectional attention is not supported")
    layers = list(inner.layers[: cfg.num_hidden_layers])
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if type(layer).__name__ != layer_cls or type(attn).__name__ != attn_cls:
            raise UnsupportedModelError(
                f"{name}: layer {i} is a {type(layer).__name__} with "
                f"{type(attn).__name__}; the {family} adapter knows {layer_cls} with "
                f"{attn_cls} only and will not patch this model half-way"
            )
        for attr in ("q_proj", "k_proj", "v_proj", "head_dim", "scaling", "layer_idx"):
            if not hasattr(attn, attr):
                raise UnsupportedModelError(f"{name}: layer {i} attention lacks {attr!r}")
    rt = runtime(model, inner, layers)  # reads the forwards' argument names (or refuses)
    attn_dim = cfg.num_attention_heads * rt.attns[0].head_dim
    cost = CostModel(
        depth=len(layers),
        dim=cfg.hidden_size,
        mlp_dim=cfg.intermediate_size,
        attn_dim=attn_dim,
        mlp_mats=3,
    )
    pre = [(inner, lambda p: rt.model_pre)]
    pre += [(layer, lambda p, i=i: rt.layer_pre(i)) for i, layer in enumerate(layers)]
    post = [(inner, lambda p: rt.model_post)]
    post += [(a, lambda p, i=i: rt.attn_post(i)) for i, a in enumerate(rt.attns)]
    if model is not inner:  # a causal LM (or VLM) around the base model: loss, entry check
        pre.insert(0, (model, lambda p: rt.outer_pre))
        post.append((model, lambda p: rt.outer_post))
    target = Target(
        family=family,
        blocks=[],  # no block forward is replaced: this adapter works through hooks only
        spec=None,  # type: ignore[arg-type]
        cost=cost,
        n_prefix=0,
        prop_attn=False,
        extra_patches=[(model, ATTR, rt.bind)],
        pre_hooks=pre,
        post_hooks=post,
    )
    return target, rt


ADAPTERS.append(DecoderAdapter())


def runtime_of(model: nn.Module) -> _Runtime:
    """The hf-decoder runtime of a patched model (raises if it is not patched)."""
    rt = getattr(model, ATTR, None)
    if rt is None:
        raise ValueError(
            f"{type(model).__name__} is not patched with a kv or decoder method; call "
            "tm.apply(model, method) first"
        )
    return rt
