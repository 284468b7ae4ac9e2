"""Per-token outputs and the patch grid (issue 9, classes 2 and 3).

Backbones, masked-image-modelling heads, heads that average the patch tokens, timm's
``forward_intermediates`` / ``get_intermediate_layers`` and ``output_hidden_states`` reshape or
average per-layer tokens. They run in dense mode: every feature map must have the unpatched
shape, be bit-identical at budget 0 and close at a small budget. The patch grid must come from
the patch embedding at run time (a 64x36 image with patch 4 is 16x9, not 12x12).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from models import images, make
from timm.models.vision_transformer import VisionTransformer

import tokenmerge as tm
from tokenmerge.adapters import UnsupportedModelError

IMG = 32


def _hf(cls_name: str, cfg, impl: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls_name)._from_config(cfg, attn_implementation=impl).eval()


def _vision_cfg(cfg_name: str, **extra):
    kw = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        image_size=IMG, patch_size=4,
    )  # fmt: skip
    kw.update(extra)
    return getattr(transformers, cfg_name)(**kw)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


def _close_and_exact(model, run, method_small, floor=0.8):
    """run(model) -> list of tensors: exact at budget 0, same shapes and close at a small one."""
    ref = run(model)
    with tm.patched(model, type(method_small)(r=0)):
        zero = run(model)
    with tm.patched(model, method_small):
        small = run(model)
        st = tm.state(model)
    assert st.tokens_per_layer[-1][0] < st.n_orig  # it did reduce
    assert len(ref) == len(zero) == len(small)
    for a, z, s in zip(ref, zero, small, strict=True):
        assert torch.equal(a, z)
        assert s.shape == a.shape
        assert torch.isfinite(s).all()
        assert _cos(s, a) > floor
    return ref, small


# --------------------------------------------------------------------------------------------
# HF backbones and dense heads
# --------------------------------------------------------------------------------------------

BACKBONES = {
    "dinov2": ("Dinov2Backbone", "Dinov2Config", {}),
    "dinov2-registers": ("Dinov2WithRegistersBackbone", "Dinov2WithRegistersConfig", {
        "num_register_tokens": 4}),
}  # fmt: skip


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(BACKBONES))
@torch.no_grad()
def test_hf_backbone_feature_maps_keep_their_shape(name, impl):
    cls, cfg_name, extra = BACKBONES[name]
    cfg = _vision_cfg(
        cfg_name, layerscale_value=0.3, out_features=["stage1", "stage2", "stage3"], **extra
    )
    model = _hf(cls, cfg, impl)
    x = images(2)
    ref, _ = _close_and_exact(model, lambda m: list(m(pixel_values=x).feature_maps), tm.ToMe(4))
    assert [tuple(f.shape) for f in ref] == [(2, 32, 8, 8)] * 3


@torch.no_grad()
def test_dpt_depth_head_on_a_patched_dinov2_backbone():
    """A dense head (DPT) keeps working on a patched backbone: the depth map keeps its shape."""
    backbone = _vision_cfg(
        "Dinov2Config", layerscale_value=0.3, out_features=["stage1", "stage2", "stage3"],
        reshape_hidden_states=False,
    )  # fmt: skip
    cfg = transformers.DPTConfig(
        backbone_config=backbone, neck_hidden_sizes=[16, 16, 16], fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1], head_in_index=-1, hidden_size=32, image_size=IMG,
        patch_size=4,
    )  # fmt: skip
    model = _hf("DPTForDepthEstimation", cfg)
    x = images(2)
    maps = []
    model.backbone.register_forward_hook(lambda m, a, o: maps.append(o.feature_maps))

    def run(m):
        return [model(pixel_values=x).predicted_depth, *maps[-1]]

    ref, _small = _close_and_exact(model.backbone, run, tm.ToMe(4), floor=0.9)
    assert [t.shape for t in ref[1:]] == [(2, 65, 32)] * 3  # tokens, reshaped by DPT's neck


MIM = {"vit": ("ViTForMaskedImageModeling", "ViTConfig"), "deit": (
    "DeiTForMaskedImageModeling", "DeiTConfig")}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MIM))
@torch.no_grad()
def test_masked_image_modelling_reconstructs_the_full_image(name):
    cls, cfg_name = MIM[name]
    model = _hf(cls, _vision_cfg(cfg_name, encoder_stride=4))
    x = images(2)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True

    def run(m):
        out = m(pixel_values=x, bool_masked_pos=mask)
        return [out.reconstruction, out.loss.reshape(1, 1)]

    ref, _ = _close_and_exact(model, run, tm.ToMe(4))
    assert ref[0].shape == x.shape


HEADS = {  # classification heads that average the patch tokens
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", "dinov2"),
    "dinov2-registers": ("Dinov2WithRegistersForImageClassification",
                         "Dinov2WithRegistersConfig", "dinov2_with_registers"),
    "clip": ("CLIPForImageClassification", "CLIPConfig", "vision_model"),
    "siglip": ("SiglipForImageClassification", "SiglipConfig", "vision_model"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HEADS))
@torch.no_grad()
def test_mean_pooling_heads_average_the_original_grid(name):
    """The head's mean over patch tokens equals the size-weighted mean of the merged tokens."""
    cls, cfg_name, tower = HEADS[name]
    if cfg_name in ("CLIPConfig", "SiglipConfig"):
        vision = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=64, image_size=IMG, patch_size=4)  # fmt: skip
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, vocab_size=50)  # fmt: skip
        cfg = getattr(transformers, cfg_name)(text_config=text, vision_config=vision, num_labels=3)
    else:
        cfg = _vision_cfg(cfg_name, layerscale_value=0.3, num_labels=3)
    model = _hf(cls, cfg)
    x = images(2)
    seen = []
    getattr(model, tower).register_forward_hook(lambda m, a, o: seen.append(o.last_hidden_state))
    _ref, _small = _close_and_exact(model, lambda m: [m(pixel_values=x).logits], tm.ToMe(6))
    grid = seen[-1]
    assert grid.shape[1] == seen[0].shape[1]  # the head saw the full token grid
    # the same blocks in tokens mode: size-weighted mean of the merged tokens
    base = {"dinov2": "Dinov2Model", "dinov2-registers": "Dinov2WithRegistersModel"}.get(name)
    if base is not None:
        plain = _hf(base, model.config)
        plain.load_state_dict(getattr(model, tower).state_dict())
        with tm.patched(plain, tm.ToMe(6)):
            merged = plain(pixel_values=x).last_hidden_state
            size = tm.state(plain).sizes()
        p = 1 + getattr(model.config, "num_register_tokens", 0)
        w = size[:, p:, None]
        want = (merged[:, p:] * w).sum(1) / w.sum(1)
        torch.testing.assert_close(grid[:, p:].mean(1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["hf-vit-sdpa", "hf-dinov2-reg-eager", "hf-clip-sdpa"])
@torch.no_grad()
def test_output_hidden_states_are_on_the_full_grid(name):
    model, _ = make(name)
    x = images(2)

    def run(m):
        out = m(pixel_values=x, output_hidden_states=True)
        return [*out.hidden_states, out.last_hidden_state]

    ref, _ = _close_and_exact(model, run, tm.ToMe(4), floor=0.7)
    assert len({h.shape for h in ref}) == 1


def test_unknown_classes_of_a_supported_family_are_refused_by_name():
    class MyViTHead(transformers.ViTPreTrainedModel):  # not a subclass of a known class
        def __init__(self, config):
            super().__init__(config)
            self.vit = transformers.ViTModel(config)

    model = MyViTHead(_vision_cfg("ViTConfig")).eval()
    with pytest.raises(UnsupportedModelError, match=r"MyViTHead is not supported.*ViTModel"):
        tm.apply(model, tm.ToMe(4))
    assert not any("_tokenmerge" in k for m in model.modules() for k in vars(m))


# --------------------------------------------------------------------------------------------
# timm per-layer maps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["intermediates", "get_intermediate_layers", "no_pool"])
@pytest.mark.parametrize("method", ["tome", "evit", "token_transforming"])
@torch.no_grad()
def test_timm_per_layer_maps_keep_their_shape(kind, method):
    model, _ = make("timm-dinov2-like")
    if kind == "no_pool":
        model.reset_classifier(0, "")
    x = images(2)

    def run(m):
        if kind == "intermediates":
            final, maps = m.forward_intermediates(x, indices=[0, 1, 2], norm=True)
            return [final, *maps]
        if kind == "get_intermediate_layers":
            return list(m.get_intermediate_layers(x, n=3, reshape=True))
        return [m(x)]

    ref, small = _close_and_exact(model, run, tm.get_method(method, r=4), floor=0.5)
    if kind != "no_pool":
        assert ref[-1].shape == (2, 32, 8, 8)
    # a pruned token keeps the value it had when it was dropped: no all-zero rows on the grid
    last = small[-1].flatten(2) if small[-1].dim() == 4 else small[-1].transpose(1, 2)
    assert (last.abs().sum(1) > 0).all()


@torch.no_grad()
def test_forward_intermediates_stopping_early_is_checked_too():
    model, _ = make("timm-dinov2-like")
    with tm.patched(model, tm.ToMe(4)):
        maps = model.forward_intermediates(x := images(2), indices=[0], stop_early=True)
        assert maps[1][0].shape == (2, 32, 8, 8)
        assert len(tm.state(model).tokens_per_layer) == 1
        assert model(x).shape == (2, 5)  # an ordinary forward afterwards is not dense


@torch.no_grad()
def test_timm_refuses_a_callers_attention_mask_once_it_reduces():
    model, _ = make("timm-dinov2-like")
    x = images(2)
    mask = torch.ones(2, 1, 69, 69, dtype=torch.bool)
    with tm.patched(model, tm.ToMe(4)), pytest.raises(ValueError, match="own attention mask"):
        model.forward_features(x, attn_mask=mask)
    with tm.patched(model, tm.ToMe(0)):  # budget 0: nothing to follow, runs as unpatched
        torch.testing.assert_close(
            model.forward_features(x, attn_mask=mask), model.forward_features(x)
        )


# --------------------------------------------------------------------------------------------
# The patch grid at run time
# --------------------------------------------------------------------------------------------


def _grid_after(model, call) -> tuple[int, int] | None:
    with tm.patched(model, tm.ToMe(2)):
        call()
        return tm.state(model).grid


@torch.no_grad()
def test_grid_of_non_square_and_dynamic_inputs():
    x = torch.randn(1, 3, 64, 36)  # 16 x 9 = 144 patches, also 12 x 12
    hf = make("hf-vit-sdpa")[0]
    assert _grid_after(hf, lambda: hf(pixel_values=x, interpolate_pos_encoding=True)) == (16, 9)
    torch.manual_seed(0)
    timm_dyn = VisionTransformer(
        img_size=IMG, patch_size=4, embed_dim=32, depth=3, num_heads=4, dynamic_img_size=True
    ).eval()
    assert _grid_after(timm_dyn, lambda: timm_dyn(x)) == (16, 9)
    assert _grid_after(timm_dyn, lambda: timm_dyn(images(1))) == (8, 8)
    clip = make("hf-clip-eager")[0]
    assert _grid_after(clip, lambda: clip(pixel_values=images(1))) == (8, 8)


@torch.no_grad()
def test_m3_and_gtp_use_the_true_grid():
    """M3 pools 2x2 cells of the 16x9 grid into 8x5 = 40 tokens (a 12x12 guess gives 36)."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=IMG, patch_size=4, embed_dim=32, depth=3, num_heads=4, dynamic_img_size=True
    ).eval()
    x = torch.randn(2, 3, 64, 36)
    with tm.patched(model, tm.get_method("m3", r=2, layer=0)):
        model(x)
        assert int(tm.state(model).tokens_per_layer[0][0]) == 1 + 8 * 5
    spy = []
    with tm.patched(model, tm.get_method("gtp", r=8)):
        model.blocks[0].register_forward_hook(lambda m, a, o: spy.append(tm.state(model).grid))
        out = model(x)
    assert spy[-1] == (16, 9) and torch.isfinite(out).all()
