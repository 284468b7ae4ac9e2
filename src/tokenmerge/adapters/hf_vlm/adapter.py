"""The hf-vlm adapter: which VLMs it patches, and where its hooks go."""

from __future__ import annotations

from torch import nn

from ..base import ADAPTERS, Adapter, Target
from ..hf_decoder.adapter import decoder_target
from .families import VLMS, parts_of
from .runtime import _VLMRuntime


class VLMAdapter(Adapter):
    """LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL from transformers."""

    family = "hf-vlm"
    description = (
        "transformers vision-language models (" + ", ".join(sorted(VLMS)) + "); sites "
        "projector (visual tokens before the LLM), decoder (image tokens at layer K), kv"
    )
    sites = frozenset({"projector", "decoder", "kv"})

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in VLMS

    def target(self, model: nn.Module) -> Target:
        parts = parts_of(model)
        target, rt = decoder_target(
            self.family,
            model,
            parts.language_model,
            parts.layer_cls,
            parts.attn_cls,
            lambda m, inner, layers: _VLMRuntime(m, inner, layers, parts),
        )
        target.post_hooks += rt.saliency.hooks()
        # DyMU's virtual unmerging (inactive unless a projector method asks for it)
        target.pre_hooks += [(a, lambda p: rt.attn_expand) for a in rt.attns]
        target.post_hooks += [(a, lambda p: rt.attn_merge) for a in rt.attns]
        if parts.layout == "anyres" and rt.saliency.error is None:
            original = parts.base.get_image_features
            wrap = rt.saliency.wrap_image_features
            target.extra_patches.append(
                (parts.base, "get_image_features", lambda p: wrap(original))
            )
        return target


ADAPTERS.append(VLMAdapter())
