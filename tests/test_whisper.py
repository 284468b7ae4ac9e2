"""Whisper: the encoder adapter, the size-aware decoder cross-attention, and the real tiny.en.

Tiny random ``WhisperForConditionalGeneration`` configs (``sdpa`` and ``eager``) check the
contracts for every block-site method: bit-identity at budget 0 (forward and ``generate``),
exact removal, counts, batch independence (dynamic counts included). The cross-attention bias
is checked against its definition: attending over merged tokens with ``+log s`` equals
attending over the full grid where every frame holds its merged token's value.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import tokenmerge as tm
from tokenmerge.adapters import ReductionNotApplied, UnsupportedModelError
from tokenmerge.methods import REGISTRY

BLOCK_METHODS = sorted(n for n, c in REGISTRY.items() if c.site == "block")
N_TOKENS = 40  # encoder tokens (max_source_positions): 80 mel frames


def make_whisper(impl: str = "sdpa", cls: str = "WhisperForConditionalGeneration", seed: int = 0):
    import transformers

    cfg = transformers.WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=3,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=N_TOKENS,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.whisper import modeling_whisper  # WhisperEncoder: not top-level

        model = getattr(modeling_whisper, cls)._from_config(cfg, attn_implementation=impl)
    return model.eval()


def features(b: int = 3, seed: int = 1, speech: list[int] | None = None) -> torch.Tensor:
    """Mel-like inputs ``[B, 8, 80]``: a smooth "speech" stretch then constant "silence"."""
    g = torch.Generator().manual_seed(seed)
    frames = 2 * N_TOKENS
    speech = speech or [frames // (i + 2) for i in range(b)]
    x = torch.full((b, 8, frames), -0.8)
    for i, n in enumerate(speech):
        s = torch.randn(1, 8, max(n // 4, 1), generator=g)
        x[i, :, :n] = torch.nn.functional.interpolate(s, size=n, mode="linear")[0]
    return x + 0.01 * torch.randn(x.shape, generator=g)


DECODER_IDS = torch.tensor([[1, 5, 9, 3, 7]])


def run(model, x):
    """Decoder logits for a fixed prompt (teacher forcing), every encoder token used."""
    ids = DECODER_IDS.expand(x.shape[0], -1)
    return model(input_features=x, decoder_input_ids=ids).logits


def method(name: str, r=4, **kw):
    return dataclasses.replace(REGISTRY[name].example(4), r=r, **kw)


def _runs_on_audio(name: str) -> bool:
    model = make_whisper()
    try:
        with tm.patched(model, method(name)), torch.no_grad():
            run(model, features(1))
    except ValueError as e:
        if "grid" in str(e):
            return False  # pools a 2-D image grid: refused loudly (test below)
        raise
    return True


AUDIO_METHODS = [n for n in BLOCK_METHODS if _runs_on_audio(n)]
GRID_METHODS = [n for n in BLOCK_METHODS if n not in AUDIO_METHODS]


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", AUDIO_METHODS)
@torch.no_grad()
def test_zero_budget_is_bit_identical_and_remove_restores(impl, name):
    model = make_whisper(impl)
    x = features()
    ref = run(model, x)
    tm.apply(model, REGISTRY[name].example(0))
    assert torch.equal(run(model, x), ref)
    tm.remove(model)
    tm.apply(model, method(name))
    reduced = run(model, x)
    assert reduced.shape == ref.shape and not torch.equal(reduced, ref)
    assert int(tm.state(model).counts.max()) < N_TOKENS
    tm.remove(model)
    assert torch.equal(run(model, x), ref)
    assert not hasattr(model, "_tokenmerge_patch")
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("name", AUDIO_METHODS)
@torch.no_grad()
def test_counts_follow_the_schedule_and_batch_independence(name):
    model = make_whisper()
    x = features(4)
    m = method(name)
    tm.apply(model, m)
    together = run(model, x)
    st = tm.state(model)
    alone = torch.cat([run(model, x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    if not m.dynamic and m.exact_counts:
        patch = tm.patch_of(model)
        rs = m.budget.schedule(N_TOKENS, 0, patch.target.cost, m.max_r)
        want = patch.target.cost.tokens(N_TOKENS, rs)
        assert [int(c[0]) for c in st.tokens_per_layer] == want
    # merging keeps every frame's mass, pruning drops some: never more than the input
    assert bool((st.sizes().sum(1) <= N_TOKENS + 1e-4).all())


@pytest.mark.parametrize("name", GRID_METHODS)
@torch.no_grad()
def test_grid_methods_fail_loudly_on_audio(name):
    model = make_whisper()
    tm.apply(model, method(name))
    with pytest.raises(ValueError, match="grid"):
        run(model, features(1))


@torch.no_grad()
def test_generate_is_bit_identical_at_budget_zero_and_reduced_otherwise():
    model = make_whisper()
    x = features(2)
    gen = dict(
        decoder_input_ids=DECODER_IDS[:, :2].expand(2, -1), max_new_tokens=6, do_sample=False
    )
    ref = model.generate(x, **gen)
    with tm.patched(model, tm.ToMe(r=0)):
        assert torch.equal(model.generate(x, **gen), ref)
    with tm.patched(model, tm.ToMe(r=6)):
        out = model.generate(x, **gen)
        assert int(tm.state(model).counts[0]) == N_TOKENS - 3 * 6
    assert out.shape[0] == 2


# --------------------------------------------------------------------------------------------
# The cross-attention bias, against its definition
# --------------------------------------------------------------------------------------------


def _decoder_on(model, hidden, ids):
    return model.model.decoder(input_ids=ids, encoder_hidden_states=hidden).last_hidden_state


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["tome", "dtome", "pitome"])
@torch.no_grad()
def test_cross_attention_over_merged_tokens_equals_attention_over_copied_frames(impl, name):
    """softmax(q k^T + log s) over merged keys = softmax(q k^T) over the full grid where each
    frame holds its merged token (keys and values are linear in the token): the definition
    of proportional attention, checked through the decoder of a patched model."""
    model = make_whisper(impl)
    x = features(3)
    ids = DECODER_IDS.expand(3, -1)
    tm.apply(model, method(name, r=8) if name != "dtome" else REGISTRY["dtome"].example(4))
    merged = model.model.encoder(x).last_hidden_state
    st = tm.state(model)
    assert st.size is not None and merged.shape[1] < N_TOKENS
    got = _decoder_on(model, merged, ids)  # the hooks add log s (and mask padding)
    copied = st.unmerge(merged)  # [B, N0, C]: every frame holds its token's value
    tm.remove(model)
    want = _decoder_on(model, copied, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # and without the bias the two differ (the test can fail)
    assert not torch.allclose(_decoder_on(model, merged[:, : merged.shape[1]], ids), want)


@torch.no_grad()
def test_dynamic_counts_pad_the_batch_and_the_decoder_masks_the_padding():
    model = make_whisper()
    # random positions would dominate a random model's keys; real Whisper's are small
    model.model.encoder.embed_positions.weight.mul_(0.02)
    x = features(3, speech=[76, 30, 8])  # long speech, short speech, almost all silence
    dtome = REGISTRY["dtome"](thresholds=torch.tensor(0.97))
    tm.apply(model, dtome)
    together = run(model, x)
    counts = tm.state(model).counts.tolist()
    assert counts[0] > counts[1] > counts[2], counts  # silence collapses, speech keeps frames
    alone = torch.cat([run(model, x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_beam_search_repeats_the_bias():
    model = make_whisper()
    x = features(2)
    gen = dict(decoder_input_ids=DECODER_IDS[:, :2].expand(2, -1), max_new_tokens=4)
    with tm.patched(model, tm.ToMe(r=6)):
        out = model.generate(x, num_beams=3, **gen)
    assert out.shape[0] == 2


@torch.no_grad()
def test_a_bypassed_cross_attention_hook_is_not_silent():
    model = make_whisper()
    tm.apply(model, tm.ToMe(r=6))
    layer = model.model.decoder.layers[1]
    original = layer.encoder_attn

    class Bypass(torch.nn.Module):  # a framework change: calls forward, skipping the hooks
        def forward(self, *args, **kwargs):
            return original.forward(*args, **kwargs)

    layer._modules["encoder_attn"] = Bypass()
    with pytest.raises(ReductionNotApplied, match="1 of the decoder's 2 cross-attentions"):
        run(model, features(2))


@torch.no_grad()
def test_encoder_states_of_another_forward_are_refused():
    model = make_whisper()
    tm.apply(model, tm.ToMe(r=6))
    run(model, features(2))
    stale = torch.randn(2, N_TOKENS - 10, 32)
    with pytest.raises(ValueError, match="latest encoder forward"):
        _decoder_on(model, stale, DECODER_IDS.expand(2, -1))


@torch.no_grad()
def test_the_encoder_alone_returns_merged_tokens_with_sizes():
    model = make_whisper(cls="WhisperEncoder")
    x = features(2)
    ref = model(x).last_hidden_state
    with tm.patched(model, tm.ToMe(r=0)):
        assert torch.equal(model(x).last_hidden_state, ref)
    with tm.patched(model, tm.ToMe(r=5)):
        out = model(x).last_hidden_state
        assert out.shape[1] == N_TOKENS - 15
        assert tm.state(model).sizes().sum(1).tolist() == [N_TOKENS, N_TOKENS]
        dense = model(x, output_hidden_states=True).last_hidden_state
    assert dense.shape == ref.shape


@pytest.mark.parametrize(
    "cls, match",
    [
        ("WhisperForAudioClassification", "averages the encoder tokens"),
        ("WhisperForCausalLM", "decoder alone"),
    ],
)
def test_unsupported_classes_are_refused_by_name(cls, match):
    model = make_whisper(cls=cls)
    with pytest.raises(UnsupportedModelError, match=match):
        tm.apply(model, tm.ToMe(r=2))
    assert not hasattr(model, "_tokenmerge_patch")


def test_unsupported_attention_kernel_and_foreign_blocks_are_refused():
    model = make_whisper()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        tm.apply(model, tm.ToMe(r=2))
    model = make_whisper()
    model.model.encoder.layers[1] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="block 1 is a Identity"):
        tm.apply(model, tm.ToMe(r=2))
