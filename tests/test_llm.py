"""Decoder LLMs: the KV-cache site, chunked prefill and the layer-K site on tiny random
Llama, Qwen2, Qwen3, Mistral and Gemma 3 models (GQA, q/k-norm, sliding windows).

Every scorer and every decoder method is checked against a slow reference written here from
its paper's equations; every site must be bit-identical to the unpatched model at a 100%
budget (forward and greedy generate) and independent of left-padded batch neighbours.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers

import tokenmerge as tm
from tokenmerge.adapters import hf_decoder as hd
from tokenmerge.methods import REGISTRY, get_method
from tokenmerge.methods.decoder import DECODER_METHODS
from tokenmerge.methods.kv import KV_SCORERS, KVContext, position_hash, select_entries

METHODS = (*KV_SCORERS, *DECODER_METHODS)
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def tiny(family: str, impl: str = "sdpa", layers: int = 4, seed: int = 0):
    """A 2-4 layer model of ``family`` with GQA (4 query / 2 KV heads) and random norms."""
    common = dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=0,
    )  # fmt: skip
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(**common), transformers.Qwen3ForCausalLM
    elif family == "mistral":  # every layer has a sliding window
        cfg = transformers.MistralConfig(**common, sliding_window=24)
        cls = transformers.MistralForCausalLM
    else:  # Gemma 3: sliding and full layers, q/k-norm, its own attention scale
        types = ["sliding_attention", "full_attention"] * (layers // 2)
        cfg = transformers.Gemma3TextConfig(
            **common, sliding_window=12, layer_types=types, query_pre_attn_scalar=8
        )
        cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls._from_config(cfg, attn_implementation=impl).eval()
    with torch.no_grad():  # trained-looking norms: q/k-norm keys do not all share one norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def batch(lengths=(40, 33, 25), n: int = 40, cont: int = 6, seed: int = 1):
    """Left-padded ids and mask, plus a continuation per sample."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, l in enumerate(lengths):
        mask[b, n - l :] = 1
    return ids * mask, mask, torch.randint(1, 100, (len(lengths), cont), generator=g)


def example(name: str, reduce: bool):
    """A method at a 100% budget, or removing half (decoder methods at layer 1)."""
    return REGISTRY[name].example(4 if reduce else 0)


# --------------------------------------------------------------------------------------------
# Identity and removal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_full_budget_is_bit_identical_forward_and_generate(family):
    model = tiny(family)
    ids, mask, _ = batch()
    ref = model(ids, attention_mask=mask).logits
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for name in METHODS:
        with tm.patched(model, example(name, reduce=False)):
            assert torch.equal(model(ids, attention_mask=mask).logits, ref), name
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            assert torch.equal(out, gen), name
        # a real reduction, then removal: exactly the original model again
        with tm.patched(model, example(name, reduce=True)):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(model(ids, attention_mask=mask).logits, ref), name
        assert not hasattr(model, hd.ATTR) and not hasattr(model, "_tokenmerge_patch")


@torch.no_grad()
def test_full_budget_eager_and_base_model():
    def run(model, ids, mask):
        out = model(ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    ids, mask, _ = batch()
    for model in (tiny("llama", impl="eager"), tiny("qwen3").model):
        ref = run(model, ids, mask)
        for name in ("snapkv", "fastv"):
            with tm.patched(model, example(name, reduce=False)):
                assert torch.equal(run(model, ids, mask), ref)


# --------------------------------------------------------------------------------------------
# Batches with left padding
# --------------------------------------------------------------------------------------------


def _prefill_and_continue(model, method, ids, mask, cont):
    with torch.no_grad(), tm.patched(model, method):
        out = model(ids, attention_mask=mask, use_cache=True)
        full = torch.cat([mask, torch.ones_like(cont)], 1)
        nxt = model(cont, attention_mask=full, **hd.cache_kw(model, hd.cache_of(out)))
        return out.logits[:, -1], nxt.logits, hd.cache_of(out)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("name", METHODS)
def test_batch_independence_with_left_padding(family, name):
    model = tiny(family)
    lengths = (40, 33, 25)
    ids, mask, cont = batch(lengths)
    method = example(name, reduce=True)
    last, nxt, cache = _prefill_and_continue(model, method, ids, mask, cont)
    assert cache.reduced  # something was really removed
    n = ids.shape[1]
    for b, l in enumerate(lengths):
        one = _prefill_and_continue(model, method, ids[b : b + 1, n - l :],
                                    mask[b : b + 1, n - l :], cont[b : b + 1])  # fmt: skip
        torch.testing.assert_close(one[0], last[b : b + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one[1], nxt[b : b + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "fastv", "holitom_inner"])
@torch.no_grad()
def test_generate_with_reduction_is_batch_independent(name):
    model = tiny("llama")
    lengths = (40, 26)
    ids, mask, _ = batch(lengths)
    with tm.patched(model, example(name, reduce=True)):
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for b, l in enumerate(lengths):
            one = model.generate(ids[b : b + 1, 40 - l :], attention_mask=mask[b : b + 1, 40 - l :],
                                 max_new_tokens=6, do_sample=False)  # fmt: skip
            assert torch.equal(one[0, -6:], together[b, -6:])


@pytest.mark.parametrize("name", METHODS)
@torch.no_grad()
def test_padding_is_never_kept(name):
    model = tiny("llama")
    ids, mask, _ = batch((40, 21))
    method = example(name, reduce=True)
    with tm.patched(model, method):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        rt = hd.runtime_of(model)
        assert bool(rt.last.valid.any(1).all())
    pads = set(range(40 - 21))  # sample 1's padded original indices
    for idx in cache.index.values():
        kept = set(idx[1][idx[1] >= 0].tolist())
        assert not kept & pads
    if getattr(method, "shares_layers", False):  # one budget for the whole cache
        held = sum((idx >= 0).sum((1, 2)) for idx in cache.index.values())
        heads = len(cache.index) * model.config.num_key_value_heads
        assert held.tolist() == [heads * 20, heads * round(21 * 0.5)]
        return
    # kept entries never outnumber the real tokens, and every head keeps as many (unless
    # the method shares a layer's budget across heads: then their total is as many)
    for i, idx in cache.index.items():
        counts = (idx >= 0).sum(-1)
        if getattr(REGISTRY[name], "ragged", False):
            counts = counts.sum(1, keepdim=True) / counts.shape[1]
        assert bool((counts == counts[:, :1]).all()), i
        assert float(counts[1, 0]) <= 21


# --------------------------------------------------------------------------------------------
# Reference checks of the scorers (slow, from the equations)
# --------------------------------------------------------------------------------------------


def _context(seed: int = 0, b: int = 2, hkv: int = 2, groups: int = 2, n: int = 12, d: int = 4):
    """A prefill-like context: ``n`` new entries per sample, the first one of sample 1 padding."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, hkv, n, d, generator=g)
    queries = torch.randn(b, hkv * groups, n, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :2] = False
    index = torch.arange(n).expand(b, hkv, n)
    position = (valid.long().cumsum(1) - 1).clamp_min(0)[:, None].expand(b, hkv, n)
    ctx = KVContext(
        layer=3, keys=keys, values=torch.randn(b, hkv, n, d, generator=g), index=index,
        valid=valid, position=position, n_new=n, scale=d**-0.5, groups=groups,
        query_index=torch.arange(n).expand(b, n), query_valid=valid,
        query_fn=lambda rows: queries[:, :, rows],
    )  # fmt: skip
    return ctx, queries


def _ref_attention(ctx, queries, b, h, i):
    """softmax over the keys a real query ``i`` may see (real, not in its future)."""
    k = ctx.keys[b, h // ctx.groups]
    logits = []
    for j in range(ctx.length):
        ok = bool(ctx.valid[b, j]) and j <= i
        logits.append(float(queries[b, h, i] @ k[j]) * ctx.scale if ok else -math.inf)
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return [x / sum(e) for x in e]


def test_streaming_llm_reference():
    ctx, _ = _context()
    s = get_method("streaming_llm", sinks=2).score(ctx)
    for b in range(2):
        for h in range(2):
            for j in range(ctx.length):
                p = int(ctx.position[b, h, j])
                want = math.inf if p < 2 else float(p)
                assert float(s[b, h, j]) == want


def test_knorm_reference():
    ctx, _ = _context()
    s = get_method("knorm").score(ctx)
    for b in range(2):
        for h in range(2):
            for j in range(ctx.length):
                want = -math.sqrt(sum(float(x) ** 2 for x in ctx.keys[b, h, j]))
                assert abs(float(s[b, h, j]) - want) < 1e-5


def test_snapkv_reference():
    ctx, q = _context()
    w, k = 4, 3
    s = get_method("snapkv", window=w, kernel=k).score(ctx)
    n = ctx.length
    for b in range(2):
        for hk in range(2):
            pooled_heads = []
            for h in range(hk * ctx.groups, (hk + 1) * ctx.groups):
                col = [0.0] * n
                for i in range(n - w, n):
                    if ctx.valid[b, i]:
                        for j, a in enumerate(_ref_attention(ctx, q, b, h, i)):
                            col[j] += a
                pooled = [sum(col[j + t] for t in (-1, 0, 1) if 0 <= j + t < n) / k
                          for j in range(n)]  # fmt: skip
                pooled_heads.append(pooled)
            for j in range(n):
                if j >= n - w:
                    assert float(s[b, hk, j]) == math.inf
                else:
                    want = sum(p[j] for p in pooled_heads) / ctx.groups
                    assert abs(float(s[b, hk, j]) - want) < 1e-5


@pytest.mark.parametrize("stride", [1, 3])
def test_h2o_reference_and_recent_half(stride):
    """S_j = sum of A_ij over the real queries i (every stride-th, counted from the last)."""
    ctx, q = _context()
    method = get_method("h2o", ratio=0.5, recent=0.5, stride=stride)
    stats = method.update_stats(ctx)["h2o"]
    n = ctx.length
    sampled = [i for i in range(n) if (n - 1 - i) % stride == 0]
    for b in range(2):
        for hk in range(2):
            for j in range(n):
                want = sum(
                    _ref_attention(ctx, q, b, h, i)[j]
                    for h in range(hk * ctx.groups, (hk + 1) * ctx.groups)
                    for i in sampled
                    if ctx.valid[b, i]
                )
                assert abs(float(stats[b, hk, j]) - want) < 1e-4
    # chunked use: statistics accumulate over forwards
    ctx.stats = {"h2o": stats}
    assert torch.allclose(method.update_stats(ctx)["h2o"], 2 * stats)
    # of 6 kept entries, the 3 most recent real ones are forced
    forced = method.must_keep(ctx, torch.tensor([6, 6]))
    assert forced[0, 0].nonzero().flatten().tolist() == [9, 10, 11]
    assert forced[1, 1].nonzero().flatten().tolist() == [9, 10, 11]


def test_random_kv_is_uniform_and_depends_only_on_position():
    pos = torch.arange(20000)
    u = position_hash(0, 3, torch.tensor(1), pos)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert float(hist.min()) > 1800 and float(hist.max()) < 2200  # ~2000 per bin
    assert not torch.equal(u, position_hash(1, 3, torch.tensor(1), pos))  # the seed matters
    assert not torch.equal(u, position_hash(0, 3, torch.tensor(0), pos))  # so does the head
    ctx, _ = _context()
    s = get_method("random_kv").score(ctx)
    # sample 1 is sample 0 shifted by its two pad slots: same score at the same position
    assert torch.equal(s[1, :, 2:], get_method("random_kv").score(ctx)[0, :, :-2])


def test_select_entries_reference():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 10, generator=g)
    scores[0, 0, 4] = scores[0, 0, 6]  # a tie: the earlier entry wins
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    forced = torch.zeros(2, 3, 10, dtype=torch.bool)
    forced[:, :, 9] = True
    keep = torch.tensor([4, 2])
    index, slot_valid = select_entries(scores, valid, keep, forced)
    assert index.shape == (2, 3, 4)
    for b in range(2):
        for h in range(3):
            cands = [j for j in range(10) if valid[b, j]]
            key = {j: (math.inf if forced[b, h, j] else float(scores[b, h, j]), -j) for j in cands}
            want = sorted(sorted(cands, key=lambda j: key[j], reverse=True)[: int(keep[b])])
            got = index[b, h][slot_valid[b]].tolist()
            assert got == want
    assert slot_valid.tolist() == [[True] * 4, [False, False, True, True]]


def test_per_head_false_keeps_one_set_for_all_heads():
    ctx, _ = _context()
    index, _ = get_method("knorm", per_head=False).select(ctx, torch.tensor([5, 5]))
    assert torch.equal(index[:, 0], index[:, 1])


# --------------------------------------------------------------------------------------------
# The live path, compression after the fact, chunked prefill
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KV_SCORERS)
@torch.no_grad()
def test_compress_from_observed_contexts_equals_the_live_path(name):
    model = tiny("qwen3")
    ids, mask, _ = batch((40, 29))
    method = get_method(name, ratio=0.6)
    with tm.patched(model, method):
        live = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
    ctxs = {}
    with (
        tm.patched(model, get_method(name, ratio=0.0)),
        hd.observe(lambda c: ctxs.__setitem__(c.layer, c), evict=False),
    ):
        full = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        assert not full.reduced
        # KVzip's forwards after the prefill need the (patched) model and the prefill's input
        after = hd.compress(hd.fork_cache(full), ctxs, method, model=model, input_ids=ids,
                            attention_mask=mask)  # fmt: skip
    for i in range(4):
        assert torch.equal(live.layers[i].keys, after.layers[i].keys)
        assert torch.equal(live.index[i], after.index[i])
    assert full.layers[0].keys.shape[2] == 40  # the fork left the original intact


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
@torch.no_grad()
def test_chunked_prefill_with_budget_above_context_equals_ordinary_prefill(family):
    model = tiny(family)
    ids, mask, cont = batch((40, 31))
    ref = model(ids, attention_mask=mask, use_cache=True)
    full = torch.cat([mask, torch.ones_like(cont)], 1)
    ref_next = model(cont, attention_mask=full, **hd.cache_kw(model, hd.cache_of(ref))).logits
    with tm.patched(model, get_method("snapkv", ratio=0.5)):
        pre = hd.chunked_prefill(model, ids, mask, chunk=16, budget=40)
        assert not pre.cache.reduced
        torch.testing.assert_close(pre.logits, ref.logits[:, -1], atol=1e-5, rtol=1e-5)
        nxt = model(cont, attention_mask=full, **hd.cache_kw(model, pre.cache)).logits
        torch.testing.assert_close(nxt, ref_next, atol=1e-5, rtol=1e-5)
        for i, layer in enumerate(hd.cache_of(ref).layers):
            torch.testing.assert_close(pre.cache.layers[i].keys, layer.keys, atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunked_eviction_in_sliding_window_layers_is_batch_independent():
    model = tiny("mistral")  # every layer slides over 24 tokens
    lengths = (40, 27)
    ids, mask, cont = batch(lengths)

    def run(ids, mask, cont):
        with tm.patched(model, get_method("snapkv", ratio=0.5, window=4)):
            pre = hd.chunked_prefill(model, ids, mask, chunk=8, budget=12, window=2)
            assert pre.cache.reduced and pre.cache.stored(0) == 12
            full = torch.cat([pre.cache.orig_valid.long(), torch.ones_like(cont)], 1)
            return model(cont, attention_mask=full, **hd.cache_kw(model, pre.cache)).logits

    together = run(ids, mask, cont)
    for b, l in enumerate(lengths):
        one = run(ids[b : b + 1, 40 - l :], mask[b : b + 1, 40 - l :], cont[b : b + 1])
        torch.testing.assert_close(one, together[b : b + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spelling", ["canonical", "past_key_values"])
@torch.no_grad()
def test_chunked_prefill_generate_continues_at_the_right_positions(spelling):
    """Also when the cache is passed as ``past_key_values`` (deprecated in transformers 5.24)."""
    model = tiny("llama")
    ids, mask, cont = batch((40, 31))
    full_ids, full_mask = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1)
    gen = model.generate(full_ids, attention_mask=full_mask, max_new_tokens=5, do_sample=False)

    def continued(cache):
        kw = hd.cache_kw(model, cache) if spelling == "canonical" else {spelling: cache}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return model.generate(full_ids, attention_mask=full_mask, **kw, max_new_tokens=5,
                                  do_sample=False)  # fmt: skip

    with tm.patched(model, get_method("h2o", ratio=0.5)):
        pre = hd.chunked_prefill(model, ids, mask, chunk=16, budget=64)  # nothing evicted
        assert torch.equal(continued(pre.cache), gen)
        assert pre.cache.seen == full_ids.shape[1] + 4
        pre = hd.chunked_prefill(model, ids, mask, chunk=16)  # evicted to half
        assert pre.cache.reduced and pre.cache.layers[0].keys.shape[2] == 20
        assert continued(pre.cache).shape == gen.shape
        assert pre.cache.seen == full_ids.shape[1] + 4


@torch.no_grad()
def test_chunked_prefill_peak_memory_is_bounded_by_budget_plus_chunk():
    model = tiny("llama", layers=3)
    g = torch.Generator().manual_seed(0)
    per_entry = 2 * 2 * 8 * 4 + 2 * 8  # keys + values (2 heads x 8 dims, fp32) + 2 indices
    peaks = []
    with tm.patched(model, get_method("knorm", ratio=0.5)):
        for n in (64, 128, 200):
            ids = torch.randint(1, 100, (1, n), generator=g)
            pre = hd.chunked_prefill(model, ids, chunk=16, budget=24, window=4)
            peaks.append(pre.peak_bytes)
            assert pre.cache.layers[0].keys.shape[2] == 24
            # budget entries in every layer plus one chunk in the layer being written
            assert pre.peak_bytes <= (3 * 24 + 16) * per_entry
        full = hd.cache_of(model(ids, use_cache=True))  # one-shot: grows with n
    assert len(set(peaks)) == 1
    assert full.peak_bytes > 3 * peaks[0]


@torch.no_grad()
def test_chunked_stabilising_window_keeps_recent_tokens():
    model = tiny("llama", layers=2)
    ids = torch.randint(1, 100, (1, 64), generator=torch.Generator().manual_seed(5))
    with tm.patched(model, get_method("random_kv", ratio=0.5)):
        pre = hd.chunked_prefill(model, ids[:, :48], chunk=16, budget=20, window=8, final=False)
        idx = pre.cache.index[0][0]
    # after a non-final chunk, the 8 most recent tokens (40..47) are kept in every head
    for h in range(idx.shape[0]):
        assert set(range(40, 48)) <= set(idx[h].tolist())


@torch.no_grad()
def test_streaming_llm_keeps_sinks_and_recent_tokens_in_the_model():
    model = tiny("qwen2")
    ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    with tm.patched(model, get_method("streaming_llm", ratio=0.5, sinks=4)):
        cache = hd.cache_of(model(ids, use_cache=True))
    want = list(range(4)) + list(range(24, 40))
    for idx in cache.index.values():
        for h in range(idx.shape[1]):
            assert idx[0, h].tolist() == want


@torch.no_grad()
def test_per_layer_ratios():
    model = tiny("llama")
    ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    with tm.patched(model, get_method("knorm", ratio=(0.0, 0.5, 0.75, 0.5))):
        cache = hd.cache_of(model(ids, use_cache=True))
    assert [cache.stored(i) for i in range(4)] == [40, 20, 10, 20]
    assert 0 not in cache.index


# --------------------------------------------------------------------------------------------
# The decoder site: reference computations with the original position ids
# --------------------------------------------------------------------------------------------


def _manual_forward(model, ids, reduce):
    """The model layer by layer by hand; ``reduce(layer, hidden, q, k, scale)`` may return the
    kept (or merged) hidden states and their original positions before that layer."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    keep = torch.arange(ids.shape[1])
    prev = None
    for i, layer in enumerate(inner.layers):
        if prev is not None:
            out = reduce(i, h, *prev)
            if out is not None:
                h, keep = out
        cos, sin = inner.rotary_emb(h, pos[:, keep])
        a = layer.self_attn
        x = layer.input_layernorm(h)
        b, n, _ = x.shape
        q = a.q_proj(x).view(b, n, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, n, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, n, -1, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        prev = (q, repeat_kv(k, a.num_key_value_groups), a.scaling)
        att = (q @ repeat_kv(k, a.num_key_value_groups).transpose(-1, -2)) * a.scaling
        att = att.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
        o = (att.softmax(-1) @ repeat_kv(v, a.num_key_value_groups)).transpose(1, 2)
        h = h + a.o_proj(o.reshape(b, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h)), keep


@pytest.mark.parametrize("name", ["fastv", "holitom_inner"])
@torch.no_grad()
def test_fastv_and_holitom_match_a_manual_reference(name):
    model = tiny("llama", layers=4)
    ids = torch.randint(1, 100, (1, 30), generator=torch.Generator().manual_seed(4))
    ratio, k, span = 0.5, 2, (2, -1)

    def reduce(i, h, q, kk, scale):
        if i != k:
            return None
        n = h.shape[1]
        a = [0.0] * n  # last query's attention at layer K-1, averaged over heads, by hand
        for hh in range(q.shape[1]):
            logits = [float(q[0, hh, -1] @ kk[0, hh, j]) * scale for j in range(n)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            for j in range(n):
                a[j] += e[j] / sum(e) / q.shape[1]
        cand = list(range(span[0], n - 1))
        top = sorted(cand, key=lambda j: (-a[j], j))[: round(len(cand) * (1 - ratio))]
        keep = sorted(set(range(n)) - set(cand) | set(top))
        if name == "fastv":
            return h[:, keep], torch.tensor(keep)
        x = torch.nn.functional.normalize(h[0], dim=-1)
        groups = {j: [j] for j in keep}
        for i2 in set(cand) - set(top):
            best = max(top, key=lambda j: (float(x[i2] @ x[j]), -j))
            groups[best].append(i2)
        merged = torch.stack([h[0, groups[j]].mean(0) for j in keep])[None]
        return merged, torch.tensor(keep)

    ref, keep = _manual_forward(model, ids, reduce)
    method = get_method(name, ratio=ratio, layer=k, span=span)
    with tm.patched(model, method):
        out = model(ids, use_cache=True)
        rt = hd.runtime_of(model)
        assert rt.last.rep[0].tolist() == keep.tolist()
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    # layers from K on cache only the kept tokens, at their original indices
    cache = hd.cache_of(out)
    assert cache.stored(0) == 30 and cache.stored(k) == len(keep)
    assert cache.index[k][0, 0].tolist() == keep.tolist()


@torch.no_grad()
def test_decoder_site_decoding_is_consistent_with_the_reduced_cache():
    """Prefill with FastV, then decode: equals running the whole sequence with the dropped
    tokens masked out from layer K on (positions kept)."""
    model = tiny("llama", layers=3)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 100, (1, 24), generator=g)
    cont = torch.randint(1, 100, (1, 5), generator=g)
    with tm.patched(model, get_method("fastv", ratio=0.5, layer=1, span=(1, -1))):
        out = model(ids, use_cache=True)
        kept = hd.runtime_of(model).last.rep[0].tolist()
        nxt = model(cont, **hd.cache_kw(model, hd.cache_of(out))).logits
    dropped = sorted(set(range(24)) - set(kept))
    assert dropped
    seq = torch.cat([ids, cont], 1)

    # reference: drop the tokens at layer 1 and append the continuation (positions kept)
    def reduce_drop(i, h, q, kk, scale):
        if i != 1:
            return None
        keep = [j for j in range(h.shape[1]) if j not in dropped]
        return h[:, keep], torch.tensor(keep)

    ref, _ = _manual_forward(model, seq, reduce_drop)
    torch.testing.assert_close(nxt, ref[:, -5:], atol=1e-4, rtol=1e-4)


def test_aim_schedule_and_pagerank_reference():
    aim = get_method("aim_prune", ratio=1.0, start=14, end=21)
    sched = aim.schedule(28)
    assert [l for l, _ in sched] == list(range(14, 22))
    assert sched[0][1] == pytest.approx(0.875) and sched[-1][1] == pytest.approx(0.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    bias = torch.zeros(1, 1, 5, 5).masked_fill(~causal, -math.inf)
    from tokenmerge.core.state import Signals

    got = aim.scores(Signals(x=torch.zeros(1, 5, 3), k=k, q=q, scale=0.5, bias=bias))
    want = []
    for j in range(5):
        acc = 0.0
        for h in range(2):
            m = [[0.0] * 5 for _ in range(5)]
            for i in range(5):
                logits = [float(q[0, h, i] @ k[0, h, c]) * 0.5 / 0.1 if c <= i else -math.inf
                          for c in range(5)]  # fmt: skip
                mx = max(logits)
                e = [math.exp(x - mx) for x in logits]
                m[i] = [x / sum(e) for x in e]
            pi = [0.2] * 5
            for _ in range(5):
                pi = [sum(pi[i] * m[i][c] for i in range(5)) for c in range(5)]
            acc += pi[j] ** 2
        want.append(math.sqrt(acc / 2))
    assert torch.allclose(got[0], torch.tensor(want), atol=1e-5)


@torch.no_grad()
def test_aim_prunes_progressively():
    model = tiny("llama", layers=4)
    ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    with tm.patched(model, get_method("aim_prune", ratio=1.0, start=1, end=2, span=(2, -1))):
        model(ids)
        counts = [int(c) for c in hd.runtime_of(model).last.tokens_per_layer]
    span = 40 - 2 - 1  # torch rounds half to even, like the method
    assert counts == [40, 3 + int(torch.tensor(span * 0.5).round()), 3, 3]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unsupported_models_and_bad_input_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(tm.UnsupportedModelError, match="hf-decoder"):
        tm.apply(gpt2, get_method("snapkv", ratio=0.5))
    with pytest.raises(tm.UnsupportedModelError, match=r"flex_attention.*sdpa, eager"):
        model = tiny("llama")
        model.config._attn_implementation = "flex_attention"
        tm.apply(model, get_method("snapkv", ratio=0.5))
    with pytest.raises(ValueError, match="ratio="):
        get_method("snapkv", r=8)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        get_method("knorm", ratio=1.0)
    with pytest.raises(ValueError, match="per-layer ratios"):
        tm.apply(tiny("llama"), get_method("knorm", ratio=(0.5, 0.5)))
    with pytest.raises(ValueError, match="layers"):
        tm.apply(tiny("llama"), get_method("fastv", ratio=0.5, layer=4))
    with pytest.raises(ValueError, match="site"):
        tm.apply(tiny("llama"), tm.ToMe(r=2))


@torch.no_grad()
def test_a_reduced_cache_refuses_an_unpatched_model():
    model = tiny("llama")
    ids = torch.randint(1, 100, (1, 30), generator=torch.Generator().manual_seed(2))
    with tm.patched(model, get_method("knorm", ratio=0.5)):
        cache = hd.cache_of(model(ids, use_cache=True))
    with pytest.raises(RuntimeError, match="keep the model patched"):
        model(ids[:, :2], **hd.cache_kw(model, cache))


# --------------------------------------------------------------------------------------------
# Corpora: clear errors without the Debian packages, checksums before reading
# --------------------------------------------------------------------------------------------


def test_corpora_missing_or_corrupted_files_raise_clear_errors(tmp_path, monkeypatch):
    from tokenmerge.eval import corpora, zoo

    monkeypatch.setenv("TOKENMERGE_DEBIAN", str(tmp_path))
    monkeypatch.setattr(corpora, "SYSTEM_ROOTS", ())
    corpora.documents.cache_clear()
    try:
        with pytest.raises(zoo.MissingPackageError, match=r"tokenmerge\.eval\.corpora install"):
            corpora.documents("jargon")
        bad = tmp_path / "usr/share/doc/jargon-text/jargon.txt.gz"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"not the jargon file")
        with pytest.raises(zoo.ChecksumError, match="sha256 mismatch"):
            corpora.documents("jargon")
    finally:
        corpora.documents.cache_clear()
