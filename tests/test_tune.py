"""Input downsampling inside a patch, calibration plans and the autotuner (tiny random models;
the real-weight search is in docs/results and test_real_dinov2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from models import IMG, _timm_vit, images, make

import tokenmerge as tm
from tokenmerge.core.budget import PerLayer
from tokenmerge.tune import Plan, autotune
from tokenmerge.tune.autotune import scaled_schedule, shape_weights, tail_score


def _small(x: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(x, size=(side, side), mode="bicubic", antialias=True)


# ---------------------------------------------------------------------------- input_scale
@pytest.mark.parametrize("name", ["hf-vit-sdpa", "hf-dinov2-sdpa", "hf-clip-sdpa"])
@torch.no_grad()
def test_input_scale_runs_the_model_on_resized_images_hf(name):
    model, _ = make(name)
    x = images(3)
    ref = model(pixel_values=_small(x, 24), interpolate_pos_encoding=True).last_hidden_state
    with tm.patched(model, tm.ToMe(r=0), input_scale=0.75):
        out = model(pixel_values=x).last_hidden_state
        assert tm.state(model).n_orig == (24 // 4) ** 2 + 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # removed: the model runs full-size images again
    assert model(pixel_values=x).last_hidden_state.shape[1] == (IMG // 4) ** 2 + 1


@torch.no_grad()
def test_input_scale_timm_needs_dynamic_img_size():
    model = _timm_vit(num_classes=5).eval()
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        tm.apply(model, tm.ToMe(r=2), input_scale=0.5)
    assert not hasattr(model, "_tokenmerge_patch")
    dyn = _timm_vit(num_classes=5, dynamic_img_size=True).eval()
    x = images(2)
    ref = dyn(_small(x, 16))
    with tm.patched(dyn, tm.ToMe(r=0), input_scale=0.5):
        torch.testing.assert_close(dyn(x), ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(tm.ReductionNotApplied, match="bypassed"):
            dyn.forward_features(x)  # skips the resize: refused, never a silent full size
        clone = copy.deepcopy(dyn)  # a deep copy keeps the input scale
    torch.testing.assert_close(clone(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [0, 1.5, -0.5, "0.5", True])
def test_input_scale_refuses_bad_values(bad):
    model, _ = make("hf-vit-sdpa")
    with pytest.raises((TypeError, ValueError), match="input_scale"):
        tm.apply(model, tm.ToMe(r=2), input_scale=bad)
    assert not hasattr(model, "_tokenmerge_patch")


def test_input_scale_refused_for_text_models():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(cfg).eval()
    with pytest.raises(ValueError, match="vision models only"):
        tm.apply(model, tm.ToMe(r=2), input_scale=0.5)


# ---------------------------------------------------------------------------- schedules
def test_shape_weights_and_scaled_schedule_follow_their_definitions():
    w = shape_weights((0.0, 1.0, 2.0), 5)
    assert w == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    unlimited = scaled_schedule(w, 3.3, 1000, 1, lambda n, p: 10**9)
    # reference: r_l = round(a W_l) - round(a W_{l-1}) with W the cumulative weights
    cum = [sum(w[: i + 1]) for i in range(5)]
    ref = [round(3.3 * c) - (round(3.3 * cum[i - 1]) if i else 0) for i, c in enumerate(cum)]
    assert unlimited == ref and sum(unlimited) == round(3.3 * cum[-1])
    capped = scaled_schedule([1.0] * 4, 40.0, 50, 2, lambda n, p: (n - p) // 2)
    n = 50
    for r in capped:  # every layer within what it can remove
        assert 0 <= r <= (n - 2) // 2
        n -= r


def test_tail_score_is_the_mean_of_the_worst_decile():
    cos = torch.linspace(0.5, 1.0, 20)
    assert tail_score(cos) == pytest.approx(float(cos[:2].mean()))
    assert tail_score(torch.tensor([0.9])) == pytest.approx(0.9)


# ---------------------------------------------------------------------------- plans
def _plan(**kw):
    base = dict(
        method="tome",
        params={"prop_attn": True},
        schedule=(4, 2, 1),
        native_size=(32, 32),
        input_size=(24, 24),
        flops_ratio=0.4,
    )
    return Plan(**{**base, **kw})


@torch.no_grad()
def test_plan_applies_in_one_call_and_round_trips(tmp_path):
    model, _ = make("hf-dinov2-sdpa")
    x = images(3)
    plan = _plan()
    with plan.patched(model):
        out = model(pixel_values=x).last_hidden_state
        counts = tm.summary(model)["tokens_per_layer"]
    assert counts == [33.0, 31.0, 30.0]  # 36 patches + CLS at 24 px, then 4, 2, 1 removed
    with tm.patched(model, tm.ToMe(r=PerLayer((4, 2, 1)), prop_attn=True)):
        ref = model(pixel_values=_small(x, 24)).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    assert Plan.from_state_dict(json.loads(json.dumps(plan.state_dict()))) == plan


def test_plan_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        _plan(method="nosuch")
    with pytest.raises(ValueError, match="at most native_size"):
        _plan(input_size=(40, 40))
    with pytest.raises(ValueError, match=">= 0"):
        _plan(schedule=(1, -1, 0))
    with pytest.raises(ValueError, match="not a tokenmerge plan"):
        Plan.from_state_dict({"method": "tome"})
    d = _plan().state_dict()
    with pytest.raises(ValueError, match="unknown plan fields"):
        Plan.from_state_dict({**d, "extra": 1})


# ---------------------------------------------------------------------------- autotune
def _features(out):
    return out.last_hidden_state[:, 0]


@torch.no_grad()
def test_autotune_meets_its_flops_target_and_validates_on_held_out_images():
    model, _ = make("hf-dinov2-sdpa")
    x = images(48, seed=3)
    plan = autotune(model, x, flops=0.6, time_budget=30, batch_size=16, progress=False)
    assert not hasattr(model, "_tokenmerge_patch")  # left unpatched
    # the FLOPs target, recomputed from the cost model: resized input, then the schedule
    cost = tm.api.adapter_for(model).target(model).cost
    n0 = (plan.input_size[0] // 4) ** 2 + 1
    full = cost.flops(65, [65] * 3)
    flops = cost.flops(n0, cost.tokens(n0, plan.schedule)) / full
    assert flops == pytest.approx(plan.flops_ratio) and flops <= 0.6
    assert flops > 0.45, "the search should spend most of its budget"
    # held-out fidelity: the same split (seed 0), recomputed by hand
    n_hold = plan.fidelity["n"]
    assert n_hold == 12 and plan.fidelity["calibration"]["n"] == 36
    held = x[torch.randperm(48, generator=torch.Generator().manual_seed(0))[:n_hold]]
    ref = _features(model(pixel_values=held))
    with plan.patched(model):
        got = _features(model(pixel_values=held))
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert plan.fidelity["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert plan.search["target"] == {"flops": 0.6} and plan.search["candidates"] >= 2


@torch.no_grad()
def test_autotune_is_deterministic_with_a_seed():
    model, _ = make("hf-vit-sdpa")
    x = images(32, seed=4)
    kw = dict(flops=0.5, time_budget=30, batch_size=16, progress=False)
    a, b = autotune(model, x, seed=1, **kw), autotune(model, x, seed=1, **kw)
    strip = lambda p: {k: v for k, v in p.state_dict().items() if k != "search"}  # noqa: E731
    assert strip(a) == strip(b)
    assert a.search["best"] == b.search["best"]


@torch.no_grad()
def test_autotune_speed_target_times_the_candidates():
    model = _timm_vit(num_classes=0, dynamic_img_size=True).eval()
    plan = autotune(
        model,
        images(32, seed=5),
        speedup=1.3,
        time_budget=5,
        batch_size=8,
        timing_runs=1,
        progress=False,
    )
    assert plan.speedup is not None and plan.speedup > 0
    timed = plan.search["timed"]
    assert timed and all(c["speedup"] > 0 for c in timed)
    assert round(plan.speedup, 3) in [c["speedup"] for c in timed]  # the winner was timed
    assert plan.search["target"] == {"speedup": 1.3}


def test_autotune_refuses_bad_input_before_any_work():
    model, _ = make("hf-vit-sdpa")
    x = images(32)
    with pytest.raises(ValueError, match="exactly one target"):
        autotune(model, x)
    with pytest.raises(ValueError, match="exactly one target"):
        autotune(model, x, speedup=2.0, flops=0.5)
    with pytest.raises(ValueError, match="speedup"):
        autotune(model, x, speedup=0.5)
    with pytest.raises(ValueError, match=r"accepted: .*tome"):
        autotune(model, x, flops=0.5, methods=("dtome",))
    with pytest.raises(ValueError, match="at least 16 images"):
        autotune(model, x[:10], flops=0.5)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        autotune(model, x[0], flops=0.5)
    with tm.patched(model, tm.ToMe(r=1)), pytest.raises(ValueError, match="already patched"):
        autotune(model, x, flops=0.5)
    text = pytest.importorskip("transformers").BertModel(
        pytest.importorskip("transformers").BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
    )
    with pytest.raises(ValueError, match="vision"):
        autotune(text, x, flops=0.5)


@pytest.mark.real
def test_tune_cli_writes_a_plan_for_the_zoo_model(tmp_path, capsys):
    from tokenmerge.cli.main import main

    zoo = pytest.importorskip("tokenmerge.eval.zoo")
    try:
        zoo.load_vision("dinov2-s")
    except (zoo.AssetError, zoo.MissingPackageError) as e:  # pragma: no cover - setup
        pytest.skip(f"offline zoo unavailable: {e}")
    out = tmp_path / "plan.json"
    argv = ["tune", "--flops", "0.6", "--n", "24", "--time-budget", "1", "--out", str(out)]
    assert main([*argv, "--batch-size", "12"]) == 0
    plan = Plan.load(out)
    assert plan.flops_ratio <= 0.6 and plan.fidelity["n"] == 8
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a dataset"):
        main(["tune", "--flops", "0.5", "--images", str(tmp_path / "nope")])


@pytest.mark.real
def test_bench_measures_autotuned_and_saved_plans(tmp_path):
    """``tokenmerge bench --autotune 1.5 --plan FILE``: a row each, measured like a method, and
    read against downsampling and constant-r ToMe at equal speed."""
    from tokenmerge.cli.main import main

    zoo = pytest.importorskip("tokenmerge.eval.zoo")
    try:
        zoo.load_vision("dinov2-s")
    except (zoo.AssetError, zoo.MissingPackageError) as e:  # pragma: no cover - setup
        pytest.skip(f"offline zoo unavailable: {e}")
    saved = Plan("tome", {}, (4,) * 12, (224, 224), (196, 196), flops_ratio=0.6)
    saved.save(tmp_path / "mild.json")
    argv = ["bench", "--dataset", "photos", "--n", "24", "--methods", "tome", "--budgets", "8,16"]
    argv += ["--tasks", "cosine,probe,speed", "--timing-runs", "1", "--batch-size", "8"]
    argv += ["--baselines", "downsample", "--budgets-for", "downsample=196,168"]
    argv += ["--autotune", "1.5", "--autotune-time", "2", "--plan", str(tmp_path / "mild.json")]
    assert main([*argv, "--out", str(tmp_path), "--name", "p"]) == 0
    rows = {
        (r["method"], r["budget"]): r for r in json.loads((tmp_path / "p.json").read_text())["rows"]
    }
    plan, tuned = rows[("plan", "mild")], rows[("autotune", "1.5x")]
    # the saved plan ran at 196 px (197 tokens) and removed 4 tokens in every layer
    assert plan["tokens_per_layer"] == [197.0 - 4 * (i + 1) for i in range(12)]
    assert plan["flops_ratio"] < rows[("downsample", "196px")]["flops_ratio"]
    grid = tuned["params"]["input_size"] // 14
    sched = tuned["params"]["schedule"]
    assert tuned["tokens_per_layer"][0] == grid * grid + 1 - sched[0]
    assert tuned["tokens_per_layer"][-1] == grid * grid + 1 - sum(sched)
    for row in (plan, tuned):
        assert row["throughput_ratio"] > 0 and 0.5 < row["cosine"] <= 1
        assert "vs_tome_cosine_p05" in row and "vs_downsample_agreement" in row
        lo, hi = row["throughput_spread"]
        assert lo <= row["throughput_ratio"] <= hi
    md = (tmp_path / "p.md").read_text()
    assert "At equal measured speed-up" in md and "autotune 1.5x:" in md
    with pytest.raises(SystemExit, match="no such file"):
        main(["bench", "--plan", str(tmp_path / "nope.json")])
    assert main(["bench", "--autotune", "1.5", "--backend", "timm"]) == 2  # refused before loading
