"""KV methods that change *how* the cache is evicted: KVzip (scores from forwards after the
prefill), AdaKV (heads with different budgets), PyramidKV layer budgets, and the blocked
attention that H2O and KVzip score with.

References are written here from the papers' equations and checked against the unpatched
model: KVzip's scores against eager attention weights of the full sequence, and every
compressed cache against the unpatched model run with an explicit per-layer, per-head mask
over the entries kept.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import tokenmerge as tm
from tests.test_llm import _context, batch, tiny
from tokenmerge.adapters import hf_decoder as hd
from tokenmerge.adapters.hf_decoder.reconstruct import reconstruction_scores
from tokenmerge.methods import get_method
from tokenmerge.methods.kv.adakv import adaptive_select
from tokenmerge.methods.kv.pyramid import pyramid_ratios

# --------------------------------------------------------------------------------------------
# An independent check: the unpatched model with an explicit mask over the entries kept
# --------------------------------------------------------------------------------------------

_MASKS: dict[int, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kw):  # fmt: skip
    """Eager attention under ``_MASKS[layer]`` (``[B, H_q, T, T]`` bool)."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    w = (query @ k.transpose(-2, -1)) * scaling
    w = w.masked_fill(~_MASKS[module.layer_idx], -math.inf)
    p = torch.softmax(w.float(), -1).nan_to_num(0.0).to(query.dtype)
    return (p @ v).transpose(1, 2).contiguous(), p


transformers.AttentionInterface.register("tm_test_masked", _masked_attention)


def _reference_continuation(model, ids, mask, cont, cache):
    """Continuation logits of the unpatched model on ``ids + cont``, where each continuation
    query of layer ``i`` and query head ``h`` sees only the context entries ``cache`` kept at
    that layer and KV head (plus the continuation, causally); the context is exact."""
    b, n = ids.shape
    t = n + cont.shape[1]
    cfg = model.config
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    valid = torch.cat([mask.bool(), torch.ones_like(cont, dtype=torch.bool)], 1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg.num_hidden_layers):
        m = (causal[None, None] & valid[:, None, None, :]).expand(b, hq, t, t).clone()
        idx = cache.index.get(i)
        if idx is not None:
            kept = torch.zeros(b, hk, n, dtype=torch.bool)
            for bb in range(b):
                for h in range(hk):
                    for j in idx[bb, h].tolist():
                        if j >= 0:
                            kept[bb, h, j] = True
            kept_q = kept.repeat_interleave(hq // hk, 1)  # [B, H_q, n]
            m[:, :, n:, :n] &= kept_q[:, :, None, :]
        _MASKS[i] = m
    old = cfg._attn_implementation
    model.set_attn_implementation("tm_test_masked")
    try:
        logits = model(torch.cat([ids, cont], 1), attention_mask=valid.long()).logits
    finally:
        model.set_attn_implementation(old)
        _MASKS.clear()
    return logits[:, n:]


def _patched_continuation(model, method, ids, mask, cont):
    with tm.patched(model, method):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        full = torch.cat([mask, torch.ones_like(cont)], 1)
        logits = model(cont, attention_mask=full, **hd.cache_kw(model, hd.fork_cache(cache))).logits
    return logits, cache


@pytest.mark.parametrize(
    "method",
    [
        dict(name="adakv", scorer="snapkv", scorer_params={"window": 4}),
        dict(name="adakv", scorer="h2o"),
        dict(name="adakv", scorer="kvzip", scorer_params={"prompt": (5, 6, 7), "chunk": 16}),
        dict(name="kvzip", prompt=(5, 6, 7), chunk=16),
        dict(name="kvzip", prompt=(5, 6, 7), chunk=16, allocation="uniform", sink=0),
        dict(name="kvzip", prompt=(5, 6, 7), chunk=16, per_head=False),
        dict(name="snapkv", window=4, layer_budget="pyramid"),
        dict(name="h2o", stride=3),
    ],
    ids=lambda d: "-".join(str(v) for v in d.values() if not isinstance(v, dict)),
)
@torch.no_grad()
def test_compressed_cache_equals_the_unpatched_model_with_an_explicit_mask(method):
    model = tiny("llama")
    ids, mask, cont = batch((40, 31, 22))
    params = dict(method)
    m = get_method(params.pop("name"), ratio=0.6, **params)
    got, cache = _patched_continuation(model, m, ids, mask, cont)
    assert cache.index, "nothing was evicted"
    want = _reference_continuation(model, ids, mask, cont, cache)
    assert torch.allclose(got, want, atol=2e-5), float((got - want).abs().max())


# --------------------------------------------------------------------------------------------
# KVzip
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_kvzip_scores_are_the_max_attention_of_the_reconstruction_queries():
    """S_{h,j} = max over chunks, reconstruction queries and the group's query heads of the
    attention weight on context entry j (eager weights of the full sequence)."""
    model = tiny("llama", impl="eager")
    g = torch.Generator().manual_seed(4)
    n, prompt, chunk = 20, (5, 6, 7), 8
    ids = torch.randint(1, 100, (1, n), generator=g)
    method = get_method("kvzip", ratio=0.5, prompt=prompt, chunk=chunk)
    with tm.patched(model, get_method("knorm", ratio=0.0)):
        cache = hd.cache_of(model(ids, use_cache=True))
        got = reconstruction_scores(
            hd.runtime_of(model), cache, (ids, None), torch.ones_like(ids, dtype=torch.bool), method
        )
    hq, hk = model.config.num_attention_heads, model.config.num_key_value_heads
    want = torch.zeros(model.config.num_hidden_layers, hk, n)
    for e in range(n, 0, -chunk):  # chunks end at the end of the context
        s = max(e - chunk, 0)
        full = torch.cat([ids, torch.tensor([prompt]), ids[:, s:e]], 1)
        att = model(full, output_attentions=True).attentions
        for layer, a in enumerate(att):
            for h in range(hq):
                for i in range(n, full.shape[1]):
                    for j in range(n):
                        hh = h // (hq // hk)
                        want[layer, hh, j] = max(float(want[layer, hh, j]), float(a[0, h, i, j]))
    for layer in range(model.config.num_hidden_layers):
        assert torch.allclose(got[layer][0], want[layer], atol=1e-5), layer


@torch.no_grad()
def test_kvzip_evicts_after_its_scoring_forwards_in_the_prefill():
    """(That the live path equals compress of a recorded prefill is checked for every KV
    method in test_llm.py.)"""
    model = tiny("qwen3")
    ids, mask, _ = batch((40, 29))
    method = get_method("kvzip", ratio=0.6, prompt=(9, 8), chunk=16, allocation="uniform")
    with tm.patched(model, method):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        run = hd.runtime_of(model).last
    assert run.fresh and sorted(run.evicted) == [0, 1, 2, 3]  # the prefill, checked
    assert [cache.stored(i) for i in range(4)] == [16] * 4  # round(40 * 0.4)
    assert method.extra_forwards(40) == 3 and method.chunks(40) == [(0, 8), (8, 24), (24, 40)]


@torch.no_grad()
def test_kvzip_global_allocation_keeps_the_top_scores_of_the_whole_cache():
    """The paper's allocation, against a slow reference from the reconstruction scores
    (checked above against eager attention): per sample, rank every (layer, head, entry)
    by score, with the first ``sink`` real tokens and each head's best entry ranked first,
    and keep the top ``Σ_l H · round(n · (1 - ratio))``."""
    model = tiny("qwen3")
    ids, mask, _ = batch((40, 29))
    method = get_method("kvzip", ratio=0.6, prompt=(9, 8), chunk=16, sink=3)
    with tm.patched(model, get_method("knorm", ratio=0.0)):
        full = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        scores = reconstruction_scores(hd.runtime_of(model), full, (ids, None), mask.bool(), method)
    with tm.patched(model, method):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        assert hd.runtime_of(model).last.fresh  # the shared budget was checked
    depth, hk = model.config.num_hidden_layers, model.config.num_key_value_heads
    held = {(b, i, h): set(cache.index[i][b, h][cache.index[i][b, h] >= 0].tolist())
            for b in range(2) for i in range(depth) for h in range(hk)}  # fmt: skip
    for b in range(2):
        real = mask[b].nonzero().flatten().tolist()
        ranked = []
        for i in range(depth):
            for h in range(hk):
                s = {j: float(scores[i][b, h, j]) for j in real}
                best = max(real, key=lambda j: (s[j], -j))
                for j in real:
                    first = j in real[:3] or j == best
                    ranked.append(((0 if first else 1), -s[j], i, h, j))
        total = depth * hk * round(len(real) * 0.4)
        want = {(i, h, j) for _, _, i, h, j in sorted(ranked)[:total]}
        got = {(i, h, j) for (bb, i, h), js in held.items() if bb == b for j in js}
        assert got == want, b
        counts = {len(held[b, i, h]) for i in range(depth) for h in range(hk)}
        assert len(counts) > 1  # layers and heads do keep different numbers
        assert all(set(real[:3]) <= held[b, i, h] for i in range(depth) for h in range(hk))
    # per_head=False: one ranking of (layer, entry) by head-averaged score
    shared = get_method("kvzip", ratio=0.6, prompt=(9, 8), chunk=16, sink=3, per_head=False)
    with tm.patched(model, shared):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
    for b in range(2):
        real = mask[b].nonzero().flatten().tolist()
        ranked = []
        for i in range(depth):
            s = {j: float(scores[i][b, :, j].mean()) for j in real}
            best = max(real, key=lambda j: (s[j], -j))
            ranked += [((0 if j in real[:3] or j == best else 1), -s[j], i, j) for j in real]
        want = {(i, j) for _, _, i, j in sorted(ranked)[: depth * round(len(real) * 0.4)]}
        for i in range(depth):
            heads = [set(x[x >= 0].tolist()) for x in cache.index[i][b]]
            assert all(h == heads[0] for h in heads)  # the heads keep the same entries
            assert heads[0] == {j for li, j in want if li == i}, (b, i)


@torch.no_grad()
def test_kvzip_global_ranking_leaves_out_the_layers_its_reconstruction_cannot_score():
    """Gemma 3's sliding layers (window 12) drop entries during the reconstruction forwards,
    so they are ranked by recency. Those scores are positions, not attention: they must not
    compete in the global ranking. The sliding layers keep their own budget (sink + most
    recent), and the full layers share theirs."""
    model = tiny("gemma3")
    ids, mask, _ = batch((10, 8), n=10)
    method = get_method("kvzip", ratio=0.5, prompt=(9, 8), chunk=16, sink=1)
    with tm.patched(model, method):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
    keep = {0: 5, 1: 4}  # round(10 / 2), round(8 / 2)
    for b, first in ((0, 0), (1, 2)):
        for layer in (0, 2):  # sliding: the sink and the most recent, per head
            for idx in cache.index[layer][b]:
                assert idx[idx >= 0].tolist() == [first, *range(11 - keep[b], 10)]
        held = sum(int((cache.index[i][b] >= 0).sum()) for i in (1, 3))
        assert held == 2 * 2 * keep[b]  # the full layers' budget, shared


def test_kvzip_and_adakv_are_refused_where_they_cannot_work():
    model = tiny("llama")
    ids, mask, _ = batch((40, 29))
    for m in (get_method("kvzip", ratio=0.5), get_method("adakv", ratio=0.5)):
        with tm.patched(model, m), pytest.raises(ValueError, match="one-shot prefill"):
            hd.chunked_prefill(model, ids, mask, chunk=16)
    with tm.patched(model, get_method("knorm", ratio=0.0)):
        cache = hd.cache_of(model(ids, use_cache=True))
        with pytest.raises(ValueError, match="model="):
            hd.compress(cache, {}, get_method("kvzip", ratio=0.5))
    with pytest.raises(RuntimeError, match="forwards after the prefill"):
        get_method("kvzip", ratio=0.5).score(_context()[0])
    for bad, match in (
        (dict(chunk=0), "chunk"),
        (dict(prompt=(-1,)), "token ids"),
        (dict(sink=-1), "sink"),
        (dict(allocation="layer"), "allocation"),
    ):
        with pytest.raises(ValueError, match=match):
            get_method("kvzip", ratio=0.5, **bad)


def test_kvzip_prompt_closes_the_user_turn_of_the_chat_template():
    from tokenmerge.methods.kv.kvzip import REPEAT, kvzip_prompt

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, msgs, add_generation_prompt, tokenize):
            return f"<u>{msgs[0]['content']}</u><a>"

        def __call__(self, text, add_special_tokens):
            self.text = text
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

    tok = Tok()
    ids = kvzip_prompt(tok)
    assert tok.text == f"\n\n{REPEAT}</u><a>"
    assert ids == tuple(ord(c) for c in tok.text)


# --------------------------------------------------------------------------------------------
# AdaKV
# --------------------------------------------------------------------------------------------


def _ref_adaptive(scores, valid, keep, alpha):
    """Per sample: each head's top floor(alpha k), then the best H (k - floor(alpha k)) of the
    rest over all heads (ties: higher rank within its head, then earlier head)."""
    b, h, l = scores.shape
    out = []
    for bb in range(b):
        k = min(int(keep[bb]), int(valid[bb].sum()))
        guard = math.floor(k * alpha)
        cand = [(hh, j) for hh in range(h) for j in range(l) if valid[bb, j]]

        def score(c, bb=bb):
            return float(scores[bb, c[0], c[1]])

        chosen, rank = set(), {}
        for hh in range(h):
            mine = sorted((c for c in cand if c[0] == hh), key=lambda c: (-score(c), c[1]))
            rank.update({c: r for r, c in enumerate(mine)})
            chosen |= set(mine[:guard])
        rest = sorted((c for c in cand if c not in chosen),
                      key=lambda c: (-score(c), rank[c], c[0]))  # fmt: skip
        chosen |= set(rest[: h * (k - guard)])
        out.append([sorted(j for hh2, j in chosen if hh2 == hh) for hh in range(h)])
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_adaptive_select_reference(alpha):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(2, 3, 15, generator=g)
    scores[0, 1] *= 4.0  # a peaked head: it should win budget from the others
    scores[1, :, 10:] = math.inf  # forced in every head: tied, shared evenly
    valid = torch.ones(2, 15, dtype=torch.bool)
    valid[1, :4] = False
    keep = torch.tensor([5, 6])
    index, slot_valid = adaptive_select(scores, valid, keep, alpha=alpha)
    want = _ref_adaptive(scores, valid, keep, alpha)
    for b in range(2):
        got = [index[b, h][slot_valid[b, h]].tolist() for h in range(3)]
        assert got == want[b]
        assert sum(len(x) for x in got) == 3 * int(keep[b])
    if alpha == 1.0:  # the safeguard is the whole budget: uniform per-head selection
        assert bool(slot_valid.sum(-1).eq(keep[:, None]).all())


@torch.no_grad()
def test_adakv_gives_heads_unequal_budgets_with_the_layer_total():
    model = tiny("llama")
    ids, mask, _ = batch((40, 29))
    method = get_method("adakv", scorer="snapkv", scorer_params={"window": 4}, ratio=0.5)
    with tm.patched(model, method):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 44)
    unequal = False
    for i, idx in cache.index.items():
        counts = (idx >= 0).sum(-1)  # [B, H_kv]
        assert counts.sum(-1).tolist() == [2 * 20, 2 * 14], i
        unequal |= bool((counts[:, 0] != counts[:, 1]).any())
    assert unequal and cache.ragged
    for bad, match in (
        (dict(scorer="nosuch"), "choose from"),
        (dict(scorer="adakv"), "choose from"),
        (dict(alpha=1.5), "alpha"),
        (dict(scorer_params={"ratio": 0.1}), "cannot set"),
    ):
        with pytest.raises(ValueError, match=match):
            get_method("adakv", ratio=0.5, **bad)


# --------------------------------------------------------------------------------------------
# PyramidKV budgets, blocked attention (H2O's stride: test_llm.py), decode eviction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875, 0.2])
@pytest.mark.parametrize("depth", [4, 30])
def test_pyramid_ratios_reference(ratio, depth):
    beta = 20.0
    k = 1 - ratio
    top, bottom = k / beta, 2 * k - k / beta
    if bottom > 1:
        bottom, top = 1.0, 2 * k - 1
    want = [1 - (bottom - (bottom - top) * layer / (depth - 1)) for layer in range(depth)]
    got = pyramid_ratios(ratio, depth, beta)
    assert all(abs(a - b) < 1e-12 for a, b in zip(got, want, strict=True))
    assert abs(sum(1 - r for r in got) / depth - k) < 1e-9  # the same total budget
    assert all(0 <= r < 1 for r in got) and list(got) == sorted(got)  # lower layers keep more


@torch.no_grad()
def test_pyramid_budget_in_the_model():
    model = tiny("llama")
    ids, mask, _ = batch((40, 30))
    m = get_method("knorm", ratio=0.5, layer_budget="pyramid")
    with tm.patched(model, m):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
    for i, r in enumerate(pyramid_ratios(0.5, 4)):
        counts = (cache.index[i] >= 0).sum(-1)[:, 0] if i in cache.index else None
        want = [max(1, round(n * (1 - r))) for n in (40, 30)]
        assert counts is not None and counts.tolist() == want, i
    with pytest.raises(ValueError, match="pyramid"):
        get_method("knorm", ratio=(0.5, 0.5), layer_budget="pyramid")
    with pytest.raises(ValueError, match="layer_budget"):
        get_method("knorm", ratio=0.5, layer_budget="cone")


def test_blocked_attention_sum_matches_one_block():
    ctx, _ = _context(n=12)
    one = ctx.attention_sum(block=256)
    ctx._memo.clear()
    assert torch.allclose(ctx.attention_sum(block=5), one, atol=1e-6)


@torch.no_grad()
def test_decode_eviction_budgets_from_compress_per_layer_ratios_and_min_tokens():
    """TOVA holds each layer at its prefill budget while decoding: also after compress(), not
    for a layer whose ratio is 0, and not for a sample shorter than min_tokens."""
    model = tiny("llama")
    ids, mask, _ = batch((40, 20))
    tova = get_method("tova", ratio=(0.0, 0.5, 0.5, 0.5), min_tokens=30)
    ctxs = {}
    with tm.patched(model, tova):
        with hd.observe(lambda c: ctxs.__setitem__(c.layer, c), evict=False):
            full = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        cache = hd.compress(hd.fork_cache(full), ctxs, tova)
        assert sorted(cache.budgets) == [1, 2, 3]
        m = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        for _ in range(3):
            model(torch.tensor([[5], [6]]), attention_mask=m, **hd.cache_kw(model, cache))
            m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
    real = [(idx >= 0).sum(-1)[:, 0].tolist() for idx in cache.index.values()]
    assert real == [[20, 20 + 3]] * 3  # sample 0 held at 20; sample 1 (20 < 30) grows
    assert cache.stored(0) == 43  # the layer with ratio 0 stays whole
