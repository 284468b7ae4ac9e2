"""Hugging Face vision encoders: ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP towers.

Each family is a :class:`BlockSpec` over transformers' own modules; attention still dispatches
through ``config._attn_implementation`` (``sdpa`` or ``eager``), with our bias as its mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.flops import CostModel
from .base import (
    ADAPTERS,
    Adapter,
    BlockSpec,
    Target,
    UnsupportedModelError,
    check_blocks,
    class_names,
    square_grid,
)

_VIT = BlockSpec(  # ViTLayer / DeiTLayer: layernorm_before, attention, layernorm_after, mlp
    attn=lambda m, x, mask: m.dropout(m.attention(m.layernorm_before(x), mask)[0]),
    mlp=lambda m, x: m.dropout(m.mlp(m.layernorm_after(x))),
    q=lambda m: m.attention.q_proj,
    k=lambda m: m.attention.k_proj,
    heads=lambda m: m.attention.num_attention_heads,
    scale=lambda m: m.attention.scaling,
)
_DINOV2 = BlockSpec(  # Dinov2Layer: norm1, attention, layer_scale1, drop_path, norm2, mlp, ...
    attn=lambda m, x, mask: m.drop_path(
        m.layer_scale1(m.attention(m.norm1(x), attention_mask=mask)[0])
    ),
    mlp=lambda m, x: m.drop_path(m.layer_scale2(m.mlp(m.norm2(x)))),
    q=lambda m: m.attention.q_proj,
    k=lambda m: m.attention.k_proj,
    heads=lambda m: m.attention.num_attention_heads,
    scale=lambda m: m.attention.scaling,
)
_CLIP = BlockSpec(  # CLIPEncoderLayer / SiglipEncoderLayer: layer_norm1, self_attn, ...
    attn=lambda m, x, mask: m.self_attn(hidden_states=m.layer_norm1(x), attention_mask=mask)[0],
    mlp=lambda m, x: m.mlp(m.layer_norm2(x)),
    q=lambda m: m.self_attn.q_proj,
    k=lambda m: m.self_attn.k_proj,
    heads=lambda m: m.self_attn.num_heads,
    scale=lambda m: m.self_attn.scale,
)


@dataclass(frozen=True)
class _Family:
    name: str
    models: tuple[str, ...]  # model classes (by name) that carry this family
    layer: str  # the exact layer class the spec was written for
    spec: BlockSpec
    prop_attn: bool


_FAMILIES = (
    _Family("hf-vit", ("ViTModel", "ViTPreTrainedModel"), "ViTLayer", _VIT, True),
    _Family("hf-deit", ("DeiTModel", "DeiTPreTrainedModel"), "DeiTLayer", _VIT, True),
    _Family("hf-dinov2", ("Dinov2Model", "Dinov2PreTrainedModel"), "Dinov2Layer", _DINOV2, True),
    _Family(
        "hf-dinov2-registers",
        ("Dinov2WithRegistersModel", "Dinov2WithRegistersPreTrainedModel"),
        "Dinov2WithRegistersLayer",
        _DINOV2,
        True,
    ),
    _Family("hf-clip-vision", ("CLIPPreTrainedModel",), "CLIPEncoderLayer", _CLIP, False),
    _Family("hf-siglip-vision", ("SiglipPreTrainedModel",), "SiglipEncoderLayer", _CLIP, False),
)


def _n_prefix(family: str, cfg) -> int:
    if family == "hf-siglip-vision":
        return 0
    if family == "hf-deit":
        return 2
    return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)


def _siglip_head_bias(patch):
    """Pre-hook for SigLIP's attention-pooling head: proportional attention over merged keys."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        st = patch.state
        if st is None or st.size is None or (not patch.prop_attn and bool(st.valid.all())):
            return None
        bias = st.attn_bias(patch.prop_attn, args[0].dtype)  # [B, 1, 1, N]
        b, n = bias.shape[0], bias.shape[-1]
        kwargs["attn_mask"] = (
            bias.view(b, 1, 1, n)
            .expand(b, module.num_heads, 1, n)
            .reshape(b * module.num_heads, 1, n)
        )
        return args, kwargs

    return hook


def _find_blocks(root: nn.Module, fam: _Family) -> list[nn.Module]:
    """The ModuleList of encoder layers (its location differs across transformers versions)."""
    for mod in root.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and type(mod[0]).__name__ == fam.layer:
            return list(mod)
    raise UnsupportedModelError(f"{fam.name}: no list of {fam.layer} found in the model")


class HFVision(Adapter):
    family = "hf-vision"
    description = (
        "transformers ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, "
        "CLIP vision tower (CLIPModel/CLIPVisionModel), SigLIP vision tower"
    )

    def _family(self, model: nn.Module) -> _Family | None:
        names = class_names(model)
        for fam in _FAMILIES:
            if names & set(fam.models):
                return fam
        return None

    def matches(self, model: nn.Module) -> bool:
        return self._family(model) is not None

    def target(self, model: nn.Module) -> Target:
        fam = self._family(model)
        assert fam is not None
        root, cfg = model, model.config
        if fam.name in ("hf-clip-vision", "hf-siglip-vision"):
            root = (
                model if "Vision" in type(model).__name__ else getattr(model, "vision_model", None)
            )
            if root is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has no vision tower; tokenmerge patches the vision "
                    "encoder of CLIP/SigLIP models"
                )
            cfg = root.config
        blocks = _find_blocks(root, fam)
        check_blocks(blocks, fam.layer, fam.name)
        b0 = blocks[0]
        fc1 = b0.mlp.fc1 if hasattr(b0.mlp, "fc1") else getattr(b0.mlp, "weights_in", None)
        swiglu = not hasattr(b0.mlp, "fc1")
        if fc1 is None:
            raise UnsupportedModelError(f"{fam.name}: unknown MLP {type(b0.mlp).__name__}")
        cost = CostModel(
            depth=len(blocks),
            dim=cfg.hidden_size,
            mlp_dim=fc1.out_features // (2 if swiglu else 1),
            mlp_mats=3 if swiglu else 2,
        )
        pre_hooks = []
        head = next((m for m in root.modules() if type(m).__name__.endswith("PoolingHead")), None)
        if head is not None:
            pre_hooks.append((head.attention, _siglip_head_bias))
        return Target(
            family=fam.name,
            blocks=blocks,
            spec=fam.spec,
            cost=cost,
            n_prefix=_n_prefix(fam.name, cfg),
            prop_attn=fam.prop_attn,
            grid=square_grid,
            pre_hooks=pre_hooks,
        )


ADAPTERS.append(HFVision())
