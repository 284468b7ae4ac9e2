"""Tiny random models with every structural feature of the real ones (the adapter test matrix).

Each factory returns ``(model, run)`` where ``run(model, x)`` returns one tensor to compare.
LayerScale, register tokens, a distillation token and qk-norm are all present somewhere, since
the official ToMe silently dropped LayerScale on DINOv2.
"""

from __future__ import annotations

import warnings

import pytest
import torch

IMG = 32


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=IMG, patch_size=4, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def timm_dinov2_like():
    # DINOv2-style: layer scale, 4 register tokens, qk-norm; CLS pooling
    return _timm_vit(init_values=0.3, reg_tokens=4, qk_norm=True, num_classes=5)


def timm_avgpool():
    return _timm_vit(global_pool="avg", class_token=False, num_classes=5)


def timm_deit_distilled():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(
        img_size=IMG, patch_size=4, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=5
    )


def _hf(cls_name: str, cfg_name: str, impl: str, **extra):
    import transformers

    kw = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMG,
        patch_size=4,
    )
    kw.update(extra)
    cfg = getattr(transformers, cfg_name)(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls_name)._from_config(cfg, attn_implementation=impl)


def _timm_run(model, x):
    return model(x)


def _hf_run(model, x):
    out = model(pixel_values=x)
    return torch.cat([out.pooler_output.flatten(1), out.last_hidden_state[:, 0]], 1)


FACTORIES = {
    "timm-dinov2-like": (timm_dinov2_like, _timm_run),
    "timm-avgpool": (timm_avgpool, _timm_run),
    "timm-deit-distilled": (timm_deit_distilled, _timm_run),
}
for impl in ("sdpa", "eager"):
    FACTORIES.update(
        {
            f"hf-vit-{impl}": (lambda i=impl: _hf("ViTModel", "ViTConfig", i), _hf_run),
            f"hf-deit-{impl}": (lambda i=impl: _hf("DeiTModel", "DeiTConfig", i), _hf_run),
            f"hf-dinov2-{impl}": (
                lambda i=impl: _hf("Dinov2Model", "Dinov2Config", i, layerscale_value=0.3),
                _hf_run,
            ),
            f"hf-dinov2-reg-{impl}": (
                lambda i=impl: _hf(
                    "Dinov2WithRegistersModel",
                    "Dinov2WithRegistersConfig",
                    i,
                    num_register_tokens=4,
                    layerscale_value=0.3,
                ),
                _hf_run,
            ),
            f"hf-clip-{impl}": (
                lambda i=impl: _hf("CLIPVisionModel", "CLIPVisionConfig", i),
                _hf_run,
            ),
            f"hf-siglip-{impl}": (
                lambda i=impl: _hf("SiglipVisionModel", "SiglipVisionConfig", i),
                _hf_run,
            ),
        }
    )


def make(name: str, seed: int = 0):
    factory, run = FACTORIES[name]
    torch.manual_seed(seed)
    model = factory().eval()
    return model, run


def images(b: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth images so that neighbouring patches are similar, as in real photos
    base = torch.randn(b, 3, IMG // 8, IMG // 8, generator=g)
    return torch.nn.functional.interpolate(base, size=IMG, mode="bilinear") + 0.1 * torch.randn(
        b, 3, IMG, IMG, generator=g
    )


all_models = pytest.mark.parametrize("name", sorted(FACTORIES))
