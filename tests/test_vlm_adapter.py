"""The hf-vlm adapter on tiny random LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and
Qwen2.5-VL: every projector method and the decoder methods on image tokens.

What is checked, per model and method: bit-identity at budget 0 (forward and ``generate``),
token counts as scheduled, batch independence with images of different sizes (a sample alone
gives what it gives in the batch), ``generate`` on the reduced cache, and, against a reference
that runs the *unpatched* language model on the kept tokens at their original positions, that
the projector site computes exactly that.
"""

from __future__ import annotations

import pytest
import torch
from vlm_models import IMAGE, VLM_NAMES, inputs_for, make, method_for, outputs

import tokenmerge as tm
from tokenmerge.adapters.base import UnsupportedModelError
from tokenmerge.adapters.hf_decoder import runtime_of
from tokenmerge.methods.base import REGISTRY
from tokenmerge.methods.decoder import DECODER_METHODS

#: the image methods (the video-only ones are tested in test_vlm_video.py)
PROJECTOR = sorted(n for n, c in REGISTRY.items() if c.site == "projector" and not c.video_only)
#: DyMU's virtual unmerging on the merging methods (pruning ones are refused, tested below)
VTU = ["aim_merge+vtu", "m3_proj+vtu", "downsample_proj+vtu"]


@pytest.fixture(scope="module", params=VLM_NAMES)
def vlm(request):
    model, inputs = make(request.param)
    return request.param, model, inputs, *outputs(model, inputs)


@pytest.mark.parametrize("method", PROJECTOR + VTU + list(DECODER_METHODS))
def test_identity_at_zero_budget(vlm, method):
    _name, model, inputs, ref, gen = vlm
    out, again = outputs(model, inputs, method_for(method, 0.0))
    assert torch.equal(out, ref)
    assert torch.equal(again, gen)


@pytest.mark.parametrize("method", PROJECTOR + VTU + list(DECODER_METHODS))
def test_reduces_batch_independent_and_generates(vlm, method):
    name, model, inputs, _ref, _ = vlm
    ids = inputs["input_ids"]
    images = (ids == IMAGE).sum(1)
    with tm.patched(model, method_for(method, 0.5)):
        with torch.no_grad():
            out = model(**inputs).logits
        run = runtime_of(model).last
        kept = run.valid.sum(1)
        # text tokens are all kept, at their original positions; the images shrink
        text = (inputs["attention_mask"].bool() & (ids != IMAGE)).sum(1)
        assert (kept < text + images).all()
        assert (kept > text).all()
        reps = [set(r[v].tolist()) for r, v in zip(run.rep, run.valid, strict=True)]
        for b in range(ids.shape[0]):
            real = inputs["attention_mask"][b].bool()
            want = set(((ids[b] != IMAGE) & real).nonzero().flatten().tolist())
            assert want <= reps[b]
        if REGISTRY[method.removesuffix("+vtu")].exact_counts and "+vtu" not in method:
            # half of every image's tokens (LLaVA-NeXT's newline tokens are kept on top)
            assert (kept - text <= images - images // 2 + 8).all()
        # a sample alone gives what it gives in the batch (images of other sizes around it),
        # in the prefill and at every decoding step on the reduced cache
        kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        gen = model.generate(**inputs, **kw, output_logits=True)
        assert gen.sequences.shape == (ids.shape[0], ids.shape[1] + 3)
        for b in range(ids.shape[0]):
            with torch.no_grad():
                alone = model(**inputs_for(name, model, [b])).logits
            torch.testing.assert_close(alone[0, -1], out[b, -1], atol=1e-5, rtol=1e-5)
            steps = model.generate(**inputs_for(name, model, [b]), **kw, output_logits=True)
            for t in range(3):
                torch.testing.assert_close(
                    steps.logits[t][0], gen.logits[t][b], atol=1e-5, rtol=1e-5
                )
    assert out.shape[:2] == (ids.shape[0], int(kept.max()))
    if method.endswith("+vtu"):  # the cache holds every position: decoding is unchanged
        assert run.virtual is not None and run.cache.stored(0) == ids.shape[1]


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_projector_equals_unpatched_llm_on_kept_tokens(name):
    """Reference: prune with random_proj, then run the unpatched language model on the kept
    embeddings at their original (for Qwen2-VL, 3-D M-RoPE) positions."""
    model, inputs = make(name)
    inputs = inputs_for(name, model, [0])  # one sample: no padding in the reference
    captured = {}

    def grab(module, args, kwargs):
        captured["emb"] = kwargs["inputs_embeds"]
        captured["pos"] = kwargs.get("position_ids")

    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with tm.patched(model, tm.get_method("random_proj", ratio=0.5)):
            with torch.no_grad():
                out = model(**inputs).logits
            rep = runtime_of(model).last.rep[0]
    finally:
        handle.remove()
    emb = captured["emb"][:, rep]
    pos = rep[None] if name == "llava" else captured["pos"][..., rep]
    with torch.no_grad():
        h = lm(inputs_embeds=emb, position_ids=pos).last_hidden_state
        want = model.lm_head(h)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_decoding_after_a_projector_reduction_continues_at_the_original_positions():
    """Reference for generate: the first decoded token's logits equal the unpatched language
    model run on the kept embeddings plus that token, at position len(prompt)."""
    model, _ = make("llava")
    inputs = inputs_for("llava", model, [0])
    n = inputs["input_ids"].shape[1]
    captured = {}
    lm = model.model.language_model

    def grab(module, args, kwargs):  # the prefill's embeddings (the first call)
        captured.setdefault("emb", kwargs["inputs_embeds"])

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with tm.patched(model, tm.get_method("random_proj", ratio=0.5)), torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=2, do_sample=False,
                return_dict_in_generate=True, output_logits=True,
            )  # fmt: skip
            rep = runtime_of(model).last.rep[0]  # the decoding step's state: position n
            assert rep.tolist() == [n]
            model(**inputs)
            kept = runtime_of(model).last.rep[0]
    finally:
        handle.remove()
    first = out.sequences[0, n]
    emb = torch.cat([captured["emb"][:, kept], model.get_input_embeddings()(first)[None, None]], 1)
    pos = torch.cat([kept, torch.tensor([n])])[None]
    with torch.no_grad():
        want = model.lm_head(lm(inputs_embeds=emb, position_ids=pos).last_hidden_state[:, -1])
    torch.testing.assert_close(out.logits[1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VLM_NAMES)
def test_saliency_is_attention_received(name):
    """The tower's attention map handed to saliency methods: for every image, a distribution
    over its visual tokens (CLS row of a softmax, or mean attention received, then averaged
    over Qwen2-VL's merged patches), laid out like the image's tokens."""
    model, inputs = make(name)
    seen = []
    method = tm.get_method("visionzip_proj", ratio=0.5)
    original = type(method).select

    def select(self, v, keep):
        seen.append(v)
        return original(self, v, keep)

    type(method).select = select
    try:
        with tm.patched(model, method), torch.no_grad():
            model(**inputs)
    finally:
        type(method).select = original
    v = seen[0]
    sal = v.saliency.masked_fill(~v.valid | v.protected, 0)
    assert (sal >= 0).all() and (sal[v.protected] == 0).all()
    total = sal.sum(1)
    if name.startswith("qwen"):  # mean received within each image: sums to 1, over m*m = 4
        torch.testing.assert_close(total, torch.full_like(total, 0.25))
    elif name == "llava":  # CLS row over the patches (CLS's own share excluded)
        assert ((total > 0.3) & (total < 1.0)).all()
    else:  # NeXT/OneVision: every tile's map, tiles unpadded or interpolated: positive
        assert (total > 0).all()


def test_qwen25_saliency_undoes_the_window_order():
    """Qwen2.5-VL's tower runs its patches in window order: the saliency capture's inverse
    permutation must be the one the tower itself applies to its merged outputs."""
    from tokenmerge.adapters.hf_vlm.saliency import QwenSaliency

    model, inputs = make("qwen2.5-vl")
    tower = model.model.visual
    sal = QwenSaliency(tower)
    got = {}
    hooks = [
        tower.merger.register_forward_hook(lambda m, a, o: got.__setitem__("window", o)),
        tower.register_forward_pre_hook(sal._grid, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    order = torch.argsort(sal._window_index())
    assert not torch.equal(order, torch.arange(order.shape[0]))  # the windows permute
    assert torch.equal(got["window"][order], out.pooler_output)


def test_kv_method_on_vlm():
    model, inputs = make("llava")
    with torch.no_grad():
        ref = model(**inputs).logits
    with tm.patched(model, tm.get_method("snapkv", ratio=0.0)), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    with tm.patched(model, tm.get_method("snapkv", ratio=0.5)):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        cache = runtime_of(model).last.cache
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert cache.stored(0) < inputs["input_ids"].shape[1]


def test_unknown_vlm_refused_by_name():
    model, _ = make("llava")

    class MyLlava(type(model)):
        pass

    model.__class__ = MyLlava
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        tm.apply(model, tm.get_method("random_proj", ratio=0.5))


def test_projector_method_refused_on_text_llm():
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="projector"):
        tm.apply(model, tm.get_method("random_proj", ratio=0.5))


def test_budget_is_a_ratio():
    with pytest.raises(ValueError, match="ratio="):
        tm.get_method("random_proj", r=4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        tm.get_method("random_proj", ratio=1.0)


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_vtu_equals_layer_by_layer_reference(name):
    """DyMU's VTU from its definition: each layer's attention runs on the merged stream
    expanded to every original position (with that position's RoPE phase and the full causal
    mask), its output is averaged back over each merged token's copies, and the MLP runs on
    the merged stream. Written with the unpatched modules, layer by layer."""
    model, _ = make(name)
    inputs = inputs_for(name, model, [1])
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):  # registered after the patch: sees the merged stream
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]
        seen["mask"] = kwargs.get("attention_mask")

    with tm.patched(model, tm.get_method("aim_merge", ratio=0.5, vtu=True)):
        handle = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                out = model(**inputs).logits
        finally:
            handle.remove()
        virtual = runtime_of(model).last.virtual[0]
    h = seen["h"]
    n = h.shape[1]
    assert virtual.shape[0] == inputs["input_ids"].shape[1] > n
    with torch.no_grad():
        for layer in lm.layers:
            a = layer.input_layernorm(h)[:, virtual]
            o = layer.self_attn(
                hidden_states=a, position_embeddings=seen["pe"], attention_mask=seen["mask"]
            )[0]
            merged = torch.stack([o[0, virtual == s].mean(0) for s in range(n)])[None]
            h = h + merged
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        want = model.lm_head(lm.norm(h))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_vtu_refuses_pruning_methods():
    model, inputs = make("llava")
    method = tm.get_method("dart", ratio=0.5, vtu=True)
    with tm.patched(model, method), pytest.raises(ValueError, match="vtu=True dropped"):
        model(**inputs)


# ------------------------------------------------------------------ encoder methods in the tower
TOWER = ["tome", "evit", "pitome"]


@pytest.mark.parametrize("method", TOWER)
def test_tower_methods_identity_and_generate(method):
    model, inputs = make("llava")
    with torch.no_grad():
        ref = model(**inputs).logits
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tm.patched(model, tm.get_method(method, r=0)):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), gen)


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_tower_merges_reach_the_llm(method):
    """Reference: the tower hands its full grid on (merged tokens as copies of one value); the
    LLM must get each image's distinct tokens once, in order of first appearance, with every
    text token unchanged, and as many visual tokens as the tower kept."""
    model, inputs = make("llava")
    lm = model.model.language_model
    seen = {}

    def full(module, args, kwargs):
        seen["full"] = kwargs["inputs_embeds"]

    def reduced(module, args, kwargs):
        seen["reduced"] = args[0] if args else kwargs["hidden_states"]

    with tm.patched(model, tm.get_method(method, r=2)):
        h1 = lm.register_forward_pre_hook(full, with_kwargs=True)
        h2 = lm.layers[0].register_forward_pre_hook(reduced, with_kwargs=True)
        try:
            with torch.no_grad():
                out = model(**inputs).logits
        finally:
            h1.remove()
            h2.remove()
        run = runtime_of(model).last
        tower_kept = tm.state(model).counts - 1  # CLS is not a visual token here
        for b in range(3):
            alone = model(**inputs_for("llava", model, [b])).logits
            torch.testing.assert_close(alone[0, -1], out[b, -1], atol=1e-5, rtol=1e-5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b in range(ids.shape[0]):
        rows = seen["full"][b][mask[b]]
        image = (ids[b] == IMAGE)[mask[b]]
        want, have = [], []
        for row, is_image in zip(rows, image, strict=True):
            if is_image and any(torch.equal(row, w) for w, img in have if img):
                continue  # a copy of a token the tower merged
            have.append((row, bool(is_image)))
            want.append(row)
        got = seen["reduced"][b][run.valid[b]]
        assert torch.equal(got, torch.stack(want))
        assert int(run.valid[b].sum()) == int((~image).sum() + tower_kept[b])
        assert int(tower_kept[b]) < int(image.sum())


def test_tower_methods_refused_on_tiled_vlms():
    model, _ = make("llava-next")
    with pytest.raises(UnsupportedModelError, match=r"LLaVA-1\.5"):
        tm.apply(model, tm.ToMe(r=2))


def test_labels_with_projector_methods():
    model, inputs = make("llava")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss
    with tm.patched(model, tm.get_method("aim_merge", ratio=0.0)), torch.no_grad():
        assert torch.equal(model(**inputs, labels=labels).loss, ref)
    for vtu in (False, True):
        method = tm.get_method("aim_merge", ratio=0.5, vtu=vtu)
        with tm.patched(model, method), torch.no_grad():
            loss = model(**inputs, labels=labels).loss
        assert torch.isfinite(loss) and abs(float(loss) - float(ref)) < 1.0


def test_tower_pruning_drops_tokens_from_the_llm():
    """A token the tower pruned (handed on with its last value) does not reach the LLM."""
    model, inputs = make("llava")
    with tm.patched(model, tm.get_method("evit", r=3)), torch.no_grad():
        model(**inputs)
        kept = runtime_of(model).last.valid.sum(1)
        tower_kept = tm.state(model).counts - 1
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE)).sum(1)
    assert torch.equal(kept, text + tower_kept)
    assert (tower_kept == 13).all()


def test_projector_needs_input_ids():
    model, inputs = make("llava")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"].clamp_max(98))
    method = tm.get_method("random_proj", ratio=0.5)
    with tm.patched(model, method), pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
