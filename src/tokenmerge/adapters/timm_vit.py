"""timm ``VisionTransformer`` (ViT, DeiT incl. distilled, DINOv2 with registers, ...).

``forward`` and ``forward_features`` run on merged tokens (``forward_features`` returns them:
``tm.state(model).unmerge`` puts them back on the grid). ``forward_intermediates`` and
``get_intermediate_layers``, which reshape tokens into per-layer feature maps, and a model with
``global_pool=""`` (per-token outputs) run in dense mode: every block hands the full token grid
on, so every map has the unpatched shape. The patch grid is read from the patch embedding at
run time, so ``dynamic_img_size`` models and non-square inputs get their true grid.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from ..core.flops import CostModel
from .base import ADAPTERS, Adapter, BlockSpec, Target, UnsupportedModelError, class_names

SPEC = BlockSpec(
    attn=lambda m, x, mask: m.drop_path1(m.ls1(m.attn(m.norm1(x), attn_mask=mask))),
    mlp=lambda m, x: m.drop_path2(m.ls2(m.mlp(m.norm2(x)))),
    q=lambda m: m.attn.q_norm,
    k=lambda m: m.attn.k_norm,
    heads=lambda m: m.attn.num_heads,
    scale=lambda m: m.attn.scale,
    layout="bhnd",
)

_POOLS = ("token", "avg", "")


def _size_weighted_pool(patch):
    """timm's ``pool`` with 'avg' made size-weighted (merged tokens count for their sources)."""
    model = patch.model

    def pool(x: Tensor, pool_type: str | None = None) -> Tensor:
        kind = model.global_pool if pool_type is None else pool_type
        st = patch.state
        if kind != "avg" or st is None or st.size is None or x.shape[1] != st.size.shape[1]:
            return type(model).pool(model, x, pool_type)  # unreduced, or on the full grid
        p = 0 if model.pool_include_prefix else model.num_prefix_tokens
        w = st.sizes(x.dtype)[:, p:, None]
        return (x[:, p:] * w).sum(1) / w.sum(1)

    return pool


def _dense_method(model: nn.Module, name: str):
    """Wrap a method that reshapes per-layer tokens into maps so that its blocks run dense."""
    fn = getattr(type(model), name)

    def factory(patch):
        @functools.wraps(fn)
        def method(*args, **kwargs):
            with patch.dense_call():
                return fn(model, *args, **kwargs)

        return method

    return factory


class TimmViT(Adapter):
    family = "timm-vit"
    description = "timm VisionTransformer / VisionTransformerDistilled (ViT, DeiT, DINOv2, regs)"

    def matches(self, model: nn.Module) -> bool:
        return "VisionTransformer" in class_names(model) and hasattr(model, "blocks")

    def target(self, model: nn.Module) -> Target:
        blocks = list(model.blocks)
        for i, b in enumerate(blocks):
            attn = type(getattr(b, "attn", None)).__name__
            if type(b).__name__ != "Block" or attn != "Attention":
                raise UnsupportedModelError(
                    f"timm-vit: block {i} is {type(b).__name__} with {attn}; "
                    "only timm's standard Block with Attention is supported (not ResPostBlock, "
                    "ParallelBlock, RoPE or differential attention)"
                )
            if getattr(b.attn, "gate", None) is not None:
                raise UnsupportedModelError("timm-vit: gated attention is not supported")
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in _POOLS:
            raise UnsupportedModelError(
                f"timm-vit: global_pool={model.global_pool!r} is not supported with merged "
                f"tokens; supported: {_POOLS}"
            )
        b0 = blocks[0]
        cost = CostModel(
            depth=len(blocks),
            dim=b0.norm1.normalized_shape[0],
            mlp_dim=b0.mlp.fc1.out_features,
            attn_dim=b0.attn.attn_dim,
        )
        extra = []
        if model.global_pool == "avg":
            extra.append((model, "pool", _size_weighted_pool))
        for name in ("forward_intermediates", "get_intermediate_layers"):
            if hasattr(model, name):
                extra.append((model, name, _dense_method(model, name)))
        proj = getattr(model.patch_embed, "proj", None)
        return Target(
            family=self.family,
            blocks=blocks,
            spec=SPEC,
            cost=cost,
            n_prefix=model.num_prefix_tokens,
            prop_attn=True,
            grid_from=proj if isinstance(proj, nn.Conv2d) else None,
            dense=model.global_pool == "",
            extra_patches=extra,
        )


ADAPTERS.append(TimmViT())
