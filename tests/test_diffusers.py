"""ToMeSD on diffusers UNets and DiTs (tiny random configs): identity at ratio 0, removal,
shapes and counts, seeded determinism, batch independence, the merge -> compute -> unmerge
reference, the self-check and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenmerge as tm
from tokenmerge.adapters import ReductionNotApplied, UnsupportedModelError
from tokenmerge.adapters.diffusers import runtime_of
from tokenmerge.eval.zoo.diffusion import TINY as ZOO_TINY
from tokenmerge.eval.zoo.diffusion import DiffusionInputs, build
from tokenmerge.methods.tomesd import grid_destinations, mix32, stream_keys

diffusers = pytest.importorskip("diffusers")

#: test name -> the zoo's tiny configuration (eval/zoo/diffusion.py)
TINY = {
    "unet": "tiny-unet",  # SD-1.5's layout: attention at 1/1 and 1/2
    "sdxl": "tiny-sdxl-unet",  # SDXL's: none at 1/1, text_time conditioning
    "dit": "tiny-dit",
    "pixart": "tiny-pixart",
    "sd3": "tiny-sd3",
    "sd35": "tiny-sd3",  # with SD3.5's dual attention in its first block
}


def _make(name: str):
    """``(model, run(model, batch, seed, t, size) -> output)`` for a tiny config; ``size``
    is the latent side, ``t`` the timestep of every sample."""
    if name == "sd35":
        torch.manual_seed(0)
        config = {**ZOO_TINY["tiny-sd3"][1], "dual_attention_layers": (0,)}
        model = diffusers.SD3Transformer2DModel(**config).eval()
    else:
        model = build(TINY[name], seed=0).eval()
    inputs = DiffusionInputs.of(model)

    def run(m, b=2, seed=1, t=500, size=16):
        kw = _step(inputs, b, seed, t, size)
        return m(**kw)[0]

    return model, run


def _step(inputs: DiffusionInputs, b: int, seed: int, t: int, size: int) -> dict:
    kw = inputs(b, 8 * size, seed=seed)
    kw["timestep"] = t if inputs.family == "unet" else torch.full((b,), t)
    return kw


MODELS = list(TINY)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_ratio_zero_is_bit_identical_and_remove_restores(name):
    model, run = _make(name)
    ref = run(model)
    with tm.patched(
        model, tm.ToMeSD(ratio=0.0, cross_attn=name not in ("sd3", "sd35", "dit"), mlp=True)
    ):
        assert torch.equal(run(model), ref)
        assert all(r.kept == r.tokens for r in runtime_of(model).last)
    tm.apply(model, tm.ToMeSD(ratio=0.5))
    merged = run(model)
    tm.remove(model)
    assert merged.shape == ref.shape and not torch.equal(merged, ref)
    assert torch.equal(run(model), ref)
    assert not any(k.startswith("_tokenmerge") for m in model.modules() for k in vars(m))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
@torch.no_grad()
def test_every_patched_block_merges_the_scheduled_count(name, ratio):
    model, run = _make(name)
    ref = run(model)
    tm.apply(model, tm.ToMeSD(ratio=ratio))
    out = run(model)
    last = runtime_of(model).last
    assert last and out.shape == ref.shape and torch.isfinite(out).all()
    for rec in last:
        assert rec.kept == rec.tokens - int(rec.tokens * ratio)
        assert rec.downsample == (2 if name == "sdxl" else 1)
    # every block of the highest-resolution level with attention, and no other
    assert len(last) == (3 if name in ("unet", "sdxl") else 2)
    subs = {"sd3": ("attn",), "sd35": ("attn", "attn2")}.get(name, ("attn1",))
    assert last[0].sublayers == subs
    cos = F.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.5  # merged, not broken (random tiny weights)


@torch.no_grad()
def test_options_choose_sublayers_and_levels():
    model, run = _make("unet")
    with tm.patched(model, tm.ToMeSD(ratio=0.5, cross_attn=True, mlp=True, max_downsample=2)):
        run(model)
        last = runtime_of(model).last
    assert {r.downsample for r in last} == {1, 2}
    assert all(r.sublayers == ("attn1", "attn2", "ff") for r in last)
    assert [r.tokens for r in last] == [256, 64, 64, 64, 256, 256]
    with tm.patched(model, tm.ToMeSD(ratio=0.5, self_attn=False, mlp=True)):
        run(model)
        assert all(r.sublayers == ("ff",) for r in runtime_of(model).last)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_seeded_draws_are_deterministic_and_differ_by_seed(name):
    model, run = _make(name)

    def merged(**options):
        with tm.patched(model, tm.ToMeSD(ratio=0.5, **options)):
            return run(model)

    a = merged(seed=0)
    assert torch.equal(a, merged(seed=0))  # re-applied with the same seed: identical
    assert not torch.equal(a, merged(seed=1))
    # without random draws (top-left destinations) the seed plays no part
    assert torch.equal(merged(random=False, seed=0), merged(random=False, seed=1))
    assert not torch.equal(a, merged(random=False))


def test_every_step_and_block_gets_its_own_draw_and_cfg_halves_share_theirs():
    def dst(seed, t, block):
        keys = stream_keys(seed, torch.tensor(t) * 64, block)
        return grid_destinations(keys, 16, 16, 2, 2, True)[0]

    base = dst(0, [500, 500], 0)
    assert torch.equal(base[0], base[1])  # the same timestep: the same draw
    assert not torch.equal(base, dst(0, [400, 400], 0))
    assert not torch.equal(base, dst(0, [500, 500], 1))
    assert not torch.equal(base, dst(1, [500, 500], 0))
    mixed = dst(0, [500, 400], 0)
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[1], dst(0, [400], 0)[0])


@torch.no_grad()
def test_sd3_skip_layer_guidance_skips_blocks_without_a_false_alarm():
    model, _ = _make("sd3")
    kw = _step(DiffusionInputs.of(model), 1, 0, 500, 16)
    with tm.patched(model, tm.ToMeSD(ratio=0.5)):
        model(**kw, skip_layers=[1])
        assert [r.block for r in runtime_of(model).last] == ["transformer_blocks.0"]


@pytest.mark.parametrize("name", ["unet", "pixart"])
@torch.no_grad()
def test_a_sample_does_not_depend_on_its_batch_neighbours(name):
    model, run = _make(name)
    with tm.patched(model, tm.ToMeSD(ratio=0.5)):
        both = run(model, b=3)
        alone = run(model, b=3)  # same inputs
        assert torch.equal(both, alone)
    # the middle sample of a batch of 3, run in a batch of 1 with the same inputs
    kw = _step(DiffusionInputs.of(model), 3, 5, 500, 16)
    with tm.patched(model, tm.ToMeSD(ratio=0.5)):
        full = model(**kw)[0]
        one = model(**_sample(kw, 1))[0]
    torch.testing.assert_close(full[1:2], one, rtol=1e-5, atol=1e-5)


def _sample(kw, i):
    """Sample ``i`` of a step's batched keyword arguments, as a batch of one."""
    if isinstance(kw, dict):
        return {k: _sample(v, i) for k, v in kw.items()}
    return kw[i : i + 1] if isinstance(kw, torch.Tensor) and kw.dim() else kw


# ------------------------------------------------------------------ the references
def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_the_hash_is_plain_32_bit_integer_arithmetic():
    vals = [0, 1, 2, 999, 2**31 - 1, 2**31, 2**32 - 1, 123456789]
    got = mix32(torch.tensor(vals)).tolist()
    assert got == [_lowbias32(v) for v in vals]
    # draws spread over the cell: all 4 positions, none much rarer than a quarter
    keys = stream_keys(0, torch.tensor([500]), 3)
    dst, _ = grid_destinations(keys, 64, 64, 2, 2, True)
    within = (dst // 64 % 2) * 2 + dst % 64 % 2
    counts = torch.bincount(within.flatten(), minlength=4)
    assert counts.min() > 0.2 * dst.shape[1]


@pytest.mark.parametrize(("h", "w", "sx", "sy"), [(8, 8, 2, 2), (5, 7, 2, 2), (9, 6, 3, 2)])
@pytest.mark.parametrize("random", [True, False])
def test_destinations_are_one_token_per_full_cell(h, w, sx, sy, random):
    keys = torch.tensor([3, 77, 3])
    dst, src = grid_destinations(keys, h, w, sx, sy, random)
    assert torch.equal(dst[0], dst[2])  # the draw is the key's alone
    for b in range(3):
        d = set(dst[b].tolist())
        assert d.isdisjoint(src[b].tolist()) and len(d) + src.shape[1] == h * w
        for cy in range(h // sy):
            for cx in range(w // sx):
                cell = {(cy * sy + i) * w + cx * sx + j for i in range(sy) for j in range(sx)}
                (only,) = cell & d  # exactly one destination in every full cell
                if not random:
                    assert only == cy * sy * w + cx * sx
        outside = {y * w + x for y in range(h) for x in range(w)}
        outside -= {(y * w + x) for y in range(h // sy * sy) for x in range(w // sx * sx)}
        assert outside.isdisjoint(d)  # the leftover rows and columns are sources
    if random:
        assert not torch.equal(dst[0], dst[1])


def _reference_merge(x: torch.Tensor, dst: list[int], src: list[int], r: int):
    """The paper's step 2-3, by loops: each source's best destination by cosine, the r best
    sources merged; returns (groups: dst -> members, owner: token -> its output token)."""
    best = []
    for i in src:
        sims = [float(F.cosine_similarity(x[i], x[j], 0)) for j in dst]
        k = max(range(len(dst)), key=lambda k: sims[k])  # first of equal maxima
        best.append((sims[k], i, dst[k]))
    order = sorted(range(len(best)), key=lambda n: -best[n][0])  # stable: ties keep order
    owner = {t: t for t in range(x.shape[0])}
    for n in order[:r]:
        _, i, j = best[n]
        owner[i] = j
    return owner


@torch.no_grad()
def test_a_block_computes_merge_attention_unmerge_as_the_paper_says():
    """One UNet block by hand from its captured input: x + U(attn1(M(norm1(x)))), then
    cross-attention and MLP on every token, with M and U built by loops."""
    model, run = _make("unet")
    blk = model.down_blocks[0].attentions[0].transformer_blocks[0]
    seen = {}

    def grab(m, args, kwargs, out):
        seen["x"], seen["ctx"], seen["out"] = args[0], kwargs["encoder_hidden_states"], out

    method = tm.ToMeSD(ratio=0.4, seed=7)
    tm.apply(model, method)
    h = blk.register_forward_hook(grab, with_kwargs=True)
    run(model, b=2, t=321)
    h.remove()
    tm.remove(model)
    x, ctx = seen["x"], seen["ctx"]
    n = x.shape[1]
    r = int(n * 0.4)
    keys = stream_keys(7, torch.full((2,), 321 * 64), 0)
    dst, src = grid_destinations(keys, 16, 16, 2, 2, True)
    want = []
    for b in range(2):
        owner = _reference_merge(x[b], dst[b].tolist(), src[b].tolist(), r)
        reps = sorted({owner[t] for t in range(n)})
        z = blk.norm1(x[b : b + 1])[0]
        merged = torch.stack([z[[t for t in range(n) if owner[t] == o]].mean(0) for o in reps])
        y = blk.attn1(merged[None])[0]
        slot = {o: k for k, o in enumerate(reps)}
        h1 = x[b] + torch.stack([y[slot[owner[t]]] for t in range(n)])
        h2 = h1 + blk.attn2(blk.norm2(h1)[None], encoder_hidden_states=ctx[b : b + 1])[0]
        want.append(h2 + blk.ff(blk.norm3(h2)[None])[0])
    torch.testing.assert_close(seen["out"], torch.stack(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ a pipeline
def _pipeline():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=None,
        tokenizer=None,
        unet=build("tiny-unet", seed=0).eval(),
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def test_a_pipeline_is_patched_through_its_unet_and_ratio_zero_changes_no_pixel():
    pipe = _pipeline()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 7, 32, generator=g)  # tiny-unet's cross-attention width
    neg = torch.randn(1, 7, 32, generator=g)

    def images():
        return pipe(
            prompt_embeds=emb,
            negative_prompt_embeds=neg,
            height=32,
            width=32,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        ).images

    ref = images()
    assert tm.apply(pipe, tm.ToMeSD(ratio=0.0)) is pipe
    assert torch.equal(images(), ref)
    tm.remove(pipe)
    with tm.patched(pipe, tm.ToMeSD(ratio=0.5)):
        a = images()
        b = images()  # the same seed gives the same image (the draws are keyed, not streamed)
        assert runtime_of(pipe.unet).last[0].kept == 128
    assert torch.equal(a, b) and not torch.equal(a, ref)
    assert torch.equal(images(), ref)


# ------------------------------------------------------------------ the self-check
@torch.no_grad()
def test_a_bypassed_sublayer_hook_raises_instead_of_returning_unmerged_results():
    model, run = _make("unet")
    tm.apply(model, tm.ToMeSD(ratio=0.5))
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    saved = dict(attn._forward_pre_hooks), dict(attn._forward_hooks)
    attn._forward_pre_hooks.clear()
    attn._forward_hooks.clear()
    with pytest.raises(ReductionNotApplied, match="attn1 never ran through the merge hooks"):
        run(model)
    attn._forward_pre_hooks.update(saved[0])
    attn._forward_hooks.update(saved[1])
    run(model)
    blk = model.up_blocks[2].attentions[0].transformer_blocks[0]
    blk._forward_pre_hooks.clear()
    with pytest.raises(ReductionNotApplied, match="2 of the 3 patched transformer blocks"):
        run(model)
    tm.remove(model)


# ------------------------------------------------------------------ refusals
def test_options_are_checked_with_the_accepted_values():
    with pytest.raises(ValueError, match=r"ratio must lie in \[0, 0.75\]"):
        tm.ToMeSD(ratio=0.8)
    assert tm.ToMeSD(ratio=0.85, sx=4, sy=4).ratio == 0.85
    with pytest.raises(ValueError, match=r"one of \(1, 2, 4, 8\)"):
        tm.ToMeSD(max_downsample=3)
    with pytest.raises(ValueError, match="not r="):
        tm.ToMeSD(r=4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        tm.ToMeSD(sx=1, sy=1)
    with pytest.raises(ValueError, match="merges around nothing"):
        tm.ToMeSD(self_attn=False)
    with pytest.raises(TypeError, match="ratio must be a number"):
        tm.ToMeSD(ratio="0.5")


def test_models_and_methods_that_do_not_fit_are_refused_by_name():
    model, _ = _make("sdxl")
    with pytest.raises(ValueError, match=r"factors \[2, 4\]; use max_downsample=2"):
        tm.apply(model, tm.ToMeSD(max_downsample=1))
    with pytest.raises(ValueError, match="'block' site, which the diffusers adapter"):
        tm.apply(model, tm.ToMe(r=4))
    sd3, _ = _make("sd3")
    with pytest.raises(ValueError, match="none apart from self-attention"):
        tm.apply(sd3, tm.ToMeSD(cross_attn=True, self_attn=False))
    odd = diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    with pytest.raises(UnsupportedModelError, match=r"is a Attention.*UNet2DConditionModel"):
        tm.apply(odd, tm.ToMeSD())
    assert not any(k.startswith("_tokenmerge") for m in odd.modules() for k in vars(m))
    with pytest.raises(TypeError, match=r"diffusers pipeline with a \.unet"):
        tm.apply(object(), tm.ToMeSD())


@torch.no_grad()
def test_run_time_refusals_name_the_cause():
    model, run = _make("unet")
    for blk in model.modules():
        if type(blk).__name__ == "BasicTransformerBlock":
            blk.set_chunk_feed_forward(2, dim=1)
    with (
        tm.patched(model, tm.ToMeSD(ratio=0.5, mlp=True)),
        pytest.raises(RuntimeError, match="feed-forward chunking"),
    ):
        run(model)
    model, run = _make("unet")
    model.enable_gradient_checkpointing()
    with (
        tm.patched(model, tm.ToMeSD(ratio=0.5)),
        torch.enable_grad(),
        pytest.raises(ValueError, match="gradient checkpointing"),
    ):
        run(model)


@torch.no_grad()
def test_grids_that_sx_sy_do_not_divide_and_non_square_latents():
    model, _ = _make("pixart")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 10, 14, generator=g)  # 5 x 7 tokens
    ctx = torch.randn(1, 5, 24, generator=g)  # tiny-pixart's caption width
    cond = {"resolution": None, "aspect_ratio": None}
    with tm.patched(model, tm.ToMeSD(ratio=0.6, sx=2, sy=2)):
        out = model(x, ctx, timestep=torch.tensor([10]), added_cond_kwargs=cond).sample
        rec = runtime_of(model).last[0]
    assert out.shape == (1, 8, 10, 14)
    assert rec.tokens == 35 and rec.kept == 35 - min(int(35 * 0.6), 35 - 2 * 3)
    assert math.isfinite(float(out.abs().sum()))
