"""The hf-vlm adapter: which VLMs it patches, and where its hooks go."""

from __future__ import annotations

import dataclasses

from torch import nn

from ...methods.base import Method
from ...methods.projector import ProjectorMethod
from ..base import ADAPTERS, Adapter, Target, UnsupportedModelError
from ..hf_decoder.adapter import decoder_target
from ..hf_vision import HFVision
from .families import VLMS, VLMParts, parts_of
from .runtime import _VLMRuntime


class VLMAdapter(Adapter):
    """LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL from transformers."""

    family = "hf-vlm"
    description = (
        "transformers vision-language models (" + ", ".join(sorted(VLMS)) + "); sites "
        "projector (visual tokens before the LLM), decoder (image tokens at layer K), kv, "
        "block (encoder methods in a LLaVA-1.5 vision tower, merges handed on to the LLM)"
    )
    sites = frozenset({"projector", "decoder", "kv", "block"})

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in VLMS

    def target(self, model: nn.Module) -> Target:
        return self._target(model, parts_of(model))[0]

    def _target(self, model: nn.Module, parts: VLMParts) -> tuple[Target, _VLMRuntime]:
        return decoder_target(
            self.family,
            model,
            parts.language_model,
            parts.layer_cls,
            parts.attn_cls,
            lambda m, inner, layers: _VLMRuntime(m, inner, layers, parts),
        )

    def target_for(self, model: nn.Module, method: Method) -> Target:
        """The decoder runtime's hooks, plus only what ``method`` uses: the tower's attention
        (saliency methods), VTU's attention expansion, or the tower's blocks (encoder methods),
        so other forwards carry no idle hooks and the tower stays unclaimed."""
        parts = parts_of(model)
        target, rt = self._target(model, parts)
        if isinstance(method, ProjectorMethod):
            if "saliency" in method.visual_needs and rt.saliency.error is None:
                target.pre_hooks += rt.saliency.pre_hooks()
                target.post_hooks += rt.saliency.post_hooks()
                if parts.layout == "anyres":
                    original = parts.base.get_image_features
                    wrap = rt.saliency.wrap_image_features
                    target.extra_patches.append(
                        (parts.base, "get_image_features", lambda p: wrap(original))
                    )
            if method.vtu:  # DyMU's virtual unmerging
                target.pre_hooks += [(a, lambda p: rt.attn_expand) for a in rt.attns]
                target.post_hooks += [(a, lambda p: rt.attn_merge) for a in rt.attns]
        if method.site != "block":
            return target
        if parts.layout != "grid":
            raise UnsupportedModelError(
                f"{method.name} merges inside the vision tower; the hf-vlm adapter hands tower "
                "merges on to the LLM for LLaVA-1.5's one-grid-per-image layout only "
                f"({type(model).__name__} tiles or merges its images: use a projector method)"
            )
        tower = HFVision().target(parts.vision_tower)
        feat = model.config.vision_feature_layer
        if not isinstance(feat, int):
            raise UnsupportedModelError(f"vision_feature_layer={feat!r}: one layer is needed")
        # blocks after the feature layer do not reach the LLM: they are not patched
        depth = len(tower.blocks) + 1 + feat if feat < 0 else feat
        return dataclasses.replace(
            target,
            blocks=tower.blocks[:depth],
            spec=tower.spec,
            cost=dataclasses.replace(tower.cost, depth=depth),
            n_prefix=tower.n_prefix,
            prop_attn=tower.prop_attn,
            grid_from=tower.grid_from,
            entry=parts.vision_tower,
            dense=True,  # the tower hands its full grid on: the VLM's placeholders stay valid
            extra_patches=tower.extra_patches + target.extra_patches,
            pre_hooks=tower.pre_hooks + target.pre_hooks,
            post_hooks=tower.post_hooks + target.post_hooks,
        )


ADAPTERS.append(VLMAdapter())
