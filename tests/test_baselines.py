"""Vision baselines: downsampling (input sides, position tables interpolated by the framework),
and the comparison of a method with downsampling at equal measured speed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmerge.eval.baselines import (
    at_speed,
    downsample_sizes,
    matched_speed,
    parse_baselines,
    versus,
)


def test_downsample_sizes_remove_whole_patches_per_side():
    assert downsample_sizes(224, 14) == [210, 196, 182, 168, 154, 140]
    assert downsample_sizes(224, 14, (4, 2)) == [196, 168]
    assert downsample_sizes(64, 16, (1, 2, 3)) == [48, 32]  # a 1-patch side is left out


def test_parse_baselines():
    assert parse_baselines(None) == ("downsample", "random")
    assert parse_baselines("none") == ()
    assert parse_baselines(" random ") == ("random",)
    with pytest.raises(ValueError, match=r"unknown baselines \['resize'\].*downsample, random"):
        parse_baselines("downsample,resize")


@pytest.mark.parametrize("seed", range(5))
def test_at_speed_is_linear_interpolation_without_extrapolation(seed):
    rng = np.random.default_rng(seed)
    xs = np.sort(rng.uniform(1.0, 2.5, 5))
    ys = rng.uniform(0.8, 1.0, 5)
    pts = list(zip(xs.tolist(), ys.tolist(), strict=True))
    rng.shuffle(pts)  # order does not matter
    for s in np.linspace(xs[0], xs[-1], 17):
        assert at_speed(pts, float(s)) == pytest.approx(np.interp(s, xs, ys), abs=1e-12)
    assert at_speed(pts, float(xs[0]) - 1e-6) is None
    assert at_speed(pts, float(xs[-1]) + 1e-6) is None
    assert at_speed([], 1.5) is None
    assert at_speed([(1.5, 0.9)], 1.5) == 0.9
    assert at_speed([(1.5, 0.9), (1.5, 0.7), (2.0, 1.0)], 1.5) == pytest.approx(0.8)


def test_versus_downsampling_subtracts_the_ladder_at_the_method_speed():
    ladder = [
        {"method": "downsample", "throughput_ratio": s, "cosine_p05": c, "agreement": a}
        for s, c, a in [(1.2, 0.99, 0.98), (1.6, 0.95, 0.94), (2.2, 0.90, 0.90)]
    ]
    tome = {"method": "tome", "throughput_ratio": 1.4, "cosine_p05": 0.98, "agreement": 0.99}
    fast = {"method": "tome", "throughput_ratio": 3.0, "cosine_p05": 0.5, "agreement": 0.5}
    untimed = {"method": "tome", "throughput_ratio": None, "cosine_p05": 0.9, "agreement": 0.9}
    rows = [tome, fast, untimed, *ladder]
    versus(rows)
    assert tome["vs_downsample_cosine_p05"] == pytest.approx(0.98 - 0.97)
    assert tome["vs_downsample_agreement"] == pytest.approx(0.99 - 0.96)
    assert fast["vs_downsample_cosine_p05"] is None  # beyond the ladder: no extrapolation
    assert untimed["vs_downsample_agreement"] is None
    assert all("vs_downsample_agreement" not in r for r in ladder)


def test_versus_downsampling_stays_within_a_dataset():
    def ds(dataset, speeds, cos):
        return [
            {"dataset": dataset, "method": "downsample", "throughput_ratio": s,
             "cosine_p05": c, "agreement": 1.0}
            for s, c in zip(speeds, cos, strict=True)
        ]  # fmt: skip

    # "b"'s ladder covers speed 2.5 but "a"'s does not: a row of "a" is not set against "b"
    rows = ds("a", (1.2, 2.0), (0.9, 0.8)) + ds("b", (1.2, 2.0, 3.0), (0.99, 0.95, 0.95))
    a = {"dataset": "a", "method": "tome", "throughput_ratio": 1.6, "cosine_p05": 0.9,
         "agreement": 1.0}  # fmt: skip
    a_fast = a | {"throughput_ratio": 2.5}
    b = a | {"dataset": "b"}
    versus([a, a_fast, b, *rows])
    assert a["vs_downsample_cosine_p05"] == pytest.approx(0.9 - 0.85)
    assert b["vs_downsample_cosine_p05"] == pytest.approx(0.9 - 0.97)
    assert a_fast["vs_downsample_cosine_p05"] is None


def _tiny_timm(dynamic: bool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0,
        dynamic_img_size=dynamic,
    ).eval()  # fmt: skip


def test_tokens_at_a_smaller_side_interpolate_or_refuse():
    from tokenmerge.eval.zoo import IMAGENET_MEAN, IMAGENET_STD, VisionModel

    imgs = [
        np.random.default_rng(i).integers(0, 255, (50, 70, 3), dtype=np.uint8) for i in range(2)
    ]
    for dynamic in (True, False):
        vm = VisionModel("tiny", _tiny_timm(dynamic), 64, IMAGENET_MEAN, IMAGENET_STD, "timm", 16)
        small = vm.preprocess(imgs, size=48)
        assert small.shape == (2, 3, 48, 48)
        assert vm.preprocess(imgs).shape == (2, 3, 64, 64)
        with torch.no_grad():
            if dynamic:
                assert vm.tokens(small).shape == (2, 9 + 1, 192)
            else:
                with pytest.raises(ValueError, match="dynamic_img_size=True"):
                    vm.tokens(small)
    with pytest.raises(ValueError, match="at least one patch"):
        vm.preprocess(imgs, size=8)


def test_hf_vit_gets_interpolate_pos_encoding():
    from transformers import ViTConfig, ViTModel

    from tokenmerge.eval.zoo import IMAGENET_MEAN, IMAGENET_STD, VisionModel

    cfg = ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64)  # fmt: skip
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    vm = VisionModel("tiny", model, 64, IMAGENET_MEAN, IMAGENET_STD, "hf", 16)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        out = vm.tokens(x)
        want = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    assert out.shape == (1, 10, 32)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_versus_tome_reads_the_constant_r_curve_and_skips_its_own_rows():
    curve = [_row("tome", 1.2, 0.95, 0.9), _row("tome", 2.0, 0.75, 0.7)]
    plan = _row("autotune", 1.6, 0.9, 0.85)
    versus([*curve, plan], "tome")
    assert plan["vs_tome_cosine_p05"] == pytest.approx(0.9 - 0.85)
    assert plan["vs_tome_agreement"] == pytest.approx(0.85 - 0.8)
    assert all("vs_tome_cosine_p05" not in r for r in curve)


def test_matched_speed_reads_every_curve_at_the_same_speeds():
    rows = [
        _row("tome", 1.2, 0.96, 0.92),
        _row("tome", 2.2, 0.76, 0.72),
        _row("pitome", 1.4, 0.90, 0.90),
        _row("pitome", 1.8, 0.70, 0.70),
        _row("downsample", 1.1, 0.97, 0.95),
        _row("downsample", 2.5, 0.93, 0.81),
        _row("autotune", 1.6, 0.96, 0.9),
    ]
    out = matched_speed(rows, speeds=(1.3, 2.0))
    assert [e["speed"] for e in out] == [1.3, 1.6, 2.0]
    first, mid, last = out
    # slow reference: the straight line through each curve's two points
    for e in out:
        for name in ("tome", "downsample"):
            pts = [r for r in rows if r["method"] == name]
            (s0, a), (s1, b) = [(r["throughput_ratio"], r["cosine_p05"]) for r in pts]
            want = a + (b - a) * (e["speed"] - s0) / (s1 - s0)
            assert e["curves"][name]["cosine_p05"] == pytest.approx(want)
    assert "pitome" not in first["curves"] and "pitome" not in last["curves"]  # outside 1.4-1.8
    assert mid["curves"]["pitome"]["cosine_p05"] == pytest.approx(0.8)
    assert mid["point"]["method"] == "autotune" and first["point"] is None
    assert "autotune" not in mid["curves"]  # a plan is a point, not a curve
    # downsampling is higher, but it is a baseline
    assert first["best"] == {"cosine_p05": "tome", "agreement": "tome"}
    # cos p05 0.88 against pitome's 0.80; agreement 0.84 against pitome's 0.80
    assert mid["best"] == {"cosine_p05": "tome", "agreement": "tome"}
    rows[3] = _row("pitome", 1.8, 0.70, 0.95)  # pitome's agreement at 1.6: 0.925 > 0.84
    mid = matched_speed(rows, speeds=(1.3, 2.0))[1]
    assert mid["best"] == {"cosine_p05": "tome", "agreement": "pitome"}
    only = matched_speed([r for r in rows if r["method"] == "downsample"], speeds=(1.5,))
    assert only[0]["best"] == {} and "downsample" in only[0]["curves"]  # no merging method


def _row(method, speed, p05, agree, dataset="textiles"):
    return {
        "method": method,
        "dataset": dataset,
        "throughput_ratio": speed,
        "cosine_p05": p05,
        "agreement": agree,
    }
