"""Hugging Face vision encoders: ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP towers.

Each family is a :class:`BlockSpec` over transformers' own modules; attention still dispatches
through ``config._attn_implementation`` (``sdpa`` or ``eager``), with our bias as its mask.

Every model class is listed with what its head reads (:data:`HEADS`):

- ``"tokens"``: base models and heads that read the (protected, never merged) CLS token or a
  size-aware pooler. ``last_hidden_state`` holds the merged tokens
  (``tm.state(model).unmerge`` puts them back on the grid).
- ``"dense"``: backbones (``*Backbone`` reshape every stage to a feature map), masked-image
  modelling heads (they reshape the tokens to decode pixels) and classification heads that
  average the patch tokens. They run in dense mode: every block hands the full token grid on
  (tomesd's merge -> compute -> unmerge), so every map has the unpatched shape and a mean over
  patches is the mean over the original grid.

A call with ``output_hidden_states`` runs dense too, so every hidden state has the full grid.
Any other class of these families is refused by name. The patch grid comes from the patch
embedding's output at run time (non-square inputs, ``interpolate_pos_encoding``).
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
    prefix: str  # its model classes subclass ``<prefix>PreTrainedModel``
    layer: str  # the exact layer class the spec was written for
    spec: BlockSpec
    prop_attn: bool


_FAMILIES = (
    _Family("hf-vit", "ViT", "ViTLayer", _VIT, True),
    _Family("hf-deit", "DeiT", "DeiTLayer", _VIT, True),
    _Family("hf-dinov2", "Dinov2", "Dinov2Layer", _DINOV2, True),
    _Family(
        "hf-dinov2-registers", "Dinov2WithRegisters", "Dinov2WithRegistersLayer", _DINOV2, True
    ),
    _Family("hf-clip-vision", "CLIP", "CLIPEncoderLayer", _CLIP, False),
    _Family("hf-siglip-vision", "Siglip", "SiglipEncoderLayer", _CLIP, False),
)


#: model class -> what its head reads (module docstring); subclasses inherit their parent's
HEADS: dict[str, str] = {
    **dict.fromkeys(
        (
            "ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
            "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2WithRegistersModel",
            "CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipModel",
            "SiglipVisionModel",
        ),
        "tokens",
    ),
    **dict.fromkeys(
        (
            "Dinov2Backbone", "Dinov2WithRegistersBackbone", "ViTForMaskedImageModeling",
            "DeiTForMaskedImageModeling", "Dinov2ForImageClassification",
            "Dinov2WithRegistersForImageClassification", "CLIPForImageClassification",
            "SiglipForImageClassification",
        ),
        "dense",
    ),
}  # fmt: skip


def _head_of(model: nn.Module, fam: _Family) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in HEADS:
            return HEADS[cls.__name__]
    ours = {f.prefix for f in _FAMILIES if f.prefix.startswith(fam.prefix)} - {fam.prefix}
    known = sorted(
        n for n in HEADS if n.startswith(fam.prefix) and not any(map(n.startswith, ours))
    )
    raise UnsupportedModelError(
        f"{fam.name}: {type(model).__name__} is not supported (tokenmerge does not know what "
        f"its head reads from the tokens); supported classes of this family: {', '.join(known)}"
    )


def _patch_conv(root: nn.Module) -> nn.Module | None:
    """The patch embedding: the first 2-D convolution (its output grid is the patch grid)."""
    return next((m for m in root.modules() if isinstance(m, nn.Conv2d)), None)


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
        key = args[1] if len(args) > 1 else kwargs["key"]  # (probe, tokens, tokens)
        if st is None or st.size is None or key.shape[1] != st.size.shape[1]:
            return None  # unreduced, or on the full grid (dense mode)
        if not patch.prop_attn and bool(st.valid.all()):
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


def tower_layers(tower: nn.Module) -> tuple[str, BlockSpec, list[nn.Module]]:
    """``(family, spec, encoder layers)`` of a vision tower of a known family (a VLM's
    ``vision_tower``); unknown towers are refused with the list of known families."""
    names = class_names(tower)
    for fam in _FAMILIES:
        if f"{fam.prefix}PreTrainedModel" in names:
            blocks = _find_blocks(tower, fam)
            check_blocks(blocks, fam.layer, fam.name)
            return fam.name, fam.spec, blocks
    known = ", ".join(f.name for f in _FAMILIES)
    raise UnsupportedModelError(
        f"{type(tower).__name__} is not a vision tower tokenmerge knows ({known})"
    )


class HFVision(Adapter):
    family = "hf-vision"
    description = (
        "transformers ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP vision towers: "
        "base models, image classification, masked image modelling and backbones "
        "(dense feature maps)"
    )

    def _family(self, model: nn.Module) -> _Family | None:
        names = class_names(model)
        for fam in _FAMILIES:
            if f"{fam.prefix}PreTrainedModel" in names:
                return fam
        return None

    def matches(self, model: nn.Module) -> bool:
        return self._family(model) is not None

    def target(self, model: nn.Module) -> Target:
        fam = self._family(model)
        assert fam is not None
        root, cfg = model, model.config
        head = _head_of(model, fam)
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
        pool = next((m for m in root.modules() if type(m).__name__.endswith("PoolingHead")), None)
        if pool is not None:
            pre_hooks.append((pool.attention, _siglip_head_bias))
        return Target(
            family=fam.name,
            blocks=blocks,
            spec=fam.spec,
            cost=cost,
            n_prefix=_n_prefix(fam.name, cfg),
            prop_attn=fam.prop_attn,
            grid_from=_patch_conv(root),
            dense=head == "dense",
            pre_hooks=pre_hooks,
        )


ADAPTERS.append(HFVision())
