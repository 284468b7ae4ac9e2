"""Budget schedules and the errors users get for bad input."""

from __future__ import annotations

import pytest
import torch
from models import images, make

import tokenmerge as tm
from tokenmerge.core import CostModel

COST = CostModel(depth=12, dim=384, mlp_dim=1536)
MAX_R = tm.ToMe().max_r


def test_constant_and_clamping():
    assert tm.Constant(8).schedule(197, 1, COST, MAX_R) == [8] * 12
    assert tm.Constant(16).schedule(197, 1, COST, MAX_R) == [16] * 11 + [10]
    rs = tm.Constant(30).schedule(197, 1, COST, MAX_R)
    assert rs[:5] == [30] * 5 and rs[5] == (197 - 150 - 1) // 2  # clamped late, as ToMe
    assert sum(rs) <= 196


def test_inflection_matches_tome_definition():
    rs = tm.Inflection(16, -1.0).schedule(197, 1, COST, MAX_R)
    lo, hi = 32, 0  # r(1 - i) -> r(1 + i) with i = -1
    step = (hi - lo) / 11
    assert rs == [int(lo + step * i) for i in range(12)]


def test_keep_ratio_and_targets():
    rs = tm.KeepRatio(0.9).schedule(197, 1, COST, MAX_R)
    n = 197
    for r in rs:
        assert r == round((n - 1) * (1 - 0.9))
        n -= r
    rs = tm.TargetTokens(50).schedule(197, 1, COST, MAX_R)
    assert abs(197 - sum(rs) - 50) <= 6
    for target in (0.4, 0.6, 0.8):
        rs = tm.TargetFlops(target).schedule(197, 1, COST, MAX_R)
        assert abs(COST.ratio(197, COST.tokens(197, rs)) - target) < 0.03


def test_flops_model_by_hand():
    c = CostModel(depth=1, dim=2, mlp_dim=4)
    # qkv 2*n*C*3C + proj 2*n*C*C + attn 4*n^2*C + mlp 2*m*C*F*2, with n=3, m=2
    assert c.layer_flops(3, 2) == 2 * 3 * 2 * 6 + 2 * 3 * 2 * 2 + 4 * 9 * 2 + 2 * 2 * 2 * 4 * 2
    assert c.ratio(3, [3]) == 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        (-1, "non-negative"),
        ((4, 2.0), "inflection"),
        ([1, -2], "non-negative"),
        ("16", "unsupported budget"),
        (True, "must be an int"),
    ],
)
def test_bad_budgets_are_rejected(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tm.ToMe(r=bad)


@pytest.mark.parametrize("ctor", [lambda: tm.KeepRatio(0.0), lambda: tm.TargetFlops(1.5)])
def test_bad_ratios(ctor):
    with pytest.raises(ValueError, match="must lie in"):
        ctor()


@torch.no_grad()
def test_r_too_large_names_the_limit():
    model, run = make("timm-dinov2-like")  # 64 patches + CLS + 4 registers = 69 tokens
    tm.apply(model, tm.ToMe(r=40))
    with pytest.raises(ValueError, match=r"at most 32 .*\[0, 32\]"):
        run(model, images())
    tm.remove(model)
    tm.apply(model, tm.ToMe(r=[8, 8, 30]))
    with pytest.raises(ValueError, match="r=30 at layer 2 is too large"):
        run(model, images())
    tm.remove(model)
    with pytest.raises(ValueError, match="has 2 values but the model has 3"):
        tm.apply(model, tm.ToMe(r=[8, 8]))  # refused when patching, before any forward
    assert not hasattr(model, "_tokenmerge_patch")


def test_unknown_model_lists_supported_families():
    with pytest.raises(tm.UnsupportedModelError, match="Supported families") as e:
        tm.apply(torch.nn.Linear(2, 2), tm.ToMe(r=1))
    assert "timm-vit" in str(e.value) and "hf-vision" in str(e.value)


def test_patch_twice_and_remove_unpatched():
    model, _ = make("hf-vit-sdpa")
    tm.apply(model, tm.ToMe(r=2))
    with pytest.raises(ValueError, match="already patched"):
        tm.apply(model, tm.ToMe(r=2))
    tm.remove(model)
    with pytest.raises(ValueError, match="not patched"):
        tm.remove(model)


def test_unrecognised_block_is_refused_by_name():
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, block_fn=ParallelScalingBlock
    )
    with pytest.raises(tm.UnsupportedModelError, match="ParallelScalingBlock"):
        tm.apply(model, tm.ToMe(r=2))
    assert not hasattr(model, "_tokenmerge_patch")


def test_unknown_method_name():
    with pytest.raises(ValueError, match=r"registered methods: .*tome"):
        tm.get_method("nope")


def test_not_a_method():
    model, _ = make("hf-vit-sdpa")
    with pytest.raises(TypeError, match="tokenmerge method"):
        tm.apply(model, 16)


def test_two_models_patched_at_once_do_not_share_state():
    a, run = make("hf-dinov2-sdpa", seed=0)
    b, _ = make("hf-dinov2-sdpa", seed=1)
    x = images()
    tm.apply(a, tm.ToMe(r=8))
    tm.apply(b, tm.ToMe(r=[2, 2, 2]))
    with torch.no_grad():
        run(a, x)
        run(b, x)
    assert [int(c[0]) for c in tm.state(a).tokens_per_layer] == [57, 49, 41]
    assert [int(c[0]) for c in tm.state(b).tokens_per_layer] == [63, 61, 59]
