"""KeyDiff, Expected Attention and TOVA: slow references from the papers' equations, and the
scorers on real forwards of tiny models (identity at a 100% budget, left-padding batch
independence, TOVA's eviction while decoding against a hand-written greedy loop)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import transformers
from test_llm import _context, _ref_attention, batch, tiny

import tokenmerge as tm
from tokenmerge.adapters import hf_decoder as hd
from tokenmerge.methods import get_method

NAMES = ("keydiff", "expected_attention", "tova")


# --------------------------------------------------------------------------------------------
# KeyDiff
# --------------------------------------------------------------------------------------------


def _norm(x):
    return math.sqrt(sum(float(t) ** 2 for t in x))


def test_keydiff_reference():
    ctx, _ = _context()
    s = get_method("keydiff").score(ctx)
    d = ctx.keys.shape[-1]
    for b in range(2):
        for h in range(2):
            real = [j for j in range(ctx.length) if ctx.valid[b, j]]
            unit = {j: [float(x) / _norm(ctx.keys[b, h, j]) for x in ctx.keys[b, h, j]]
                    for j in real}  # fmt: skip
            anchor = [sum(unit[j][c] for j in real) / len(real) for c in range(d)]
            for j in real:  # invalid entries are never kept, whatever their score
                k = [float(x) for x in ctx.keys[b, h, j]]
                cos = sum(k[c] * anchor[c] for c in range(d)) / (_norm(k) * _norm(anchor))
                assert abs(float(s[b, h, j]) + cos) < 1e-5


def test_keydiff_anchor_ignores_padding():
    ctx, _ = _context()
    junk = ctx.keys.clone()
    junk[1, :, :2] = 1e3  # sample 1's two padding slots
    s = get_method("keydiff").score(ctx)
    s2 = get_method("keydiff").score(dataclasses.replace(ctx, keys=junk, _memo={}))
    assert torch.allclose(s[:, :, 2:], s2[:, :, 2:], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Expected Attention
# --------------------------------------------------------------------------------------------

THETA = (1.0, 0.1)  # frequencies of the test RoPE (d = 4: two rotation planes)
F_SCALE = 1.3  # its attention scaling (as YaRN's), so that R_{p+t} = R_t R_p / f matters


def _rope(positions):
    """``(cos, sin)`` ``[T, 4]``, HF layout (the two halves repeat the frequencies)."""
    ang = positions.double()[:, None] * torch.tensor(THETA * 2, dtype=torch.float64)
    return (F_SCALE * ang.cos()).float(), (F_SCALE * ang.sin()).float()


def _ea_context(offset=(0, 5)):
    """:func:`_context` with pre-RoPE queries, values and a rotary embedding; the queries of
    sample ``b`` were rotated at positions ``offset[b] + i`` (left padding shifts them)."""
    ctx, _ = _context(seed=2)
    g = torch.Generator().manual_seed(7)
    raw = torch.randn(2, 4, ctx.length, 4, generator=g)
    rows = [_rope(torch.arange(ctx.length) + o) for o in offset]
    query_rope = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    ctx = dataclasses.replace(
        ctx, raw_query_fn=lambda rows: raw[:, :, rows], rope_fn=_rope, query_rope=query_rope,
        _memo={},
    )  # fmt: skip
    return ctx, raw


def _rot_matrix(p):
    """The 4x4 matrix of the test RoPE at position ``p``, entry by entry."""
    cos, sin = _rope(torch.tensor([p]))
    c, s = [float(x) for x in cos[0]], [float(x) for x in sin[0]]
    r = [[0.0] * 4 for _ in range(4)]
    for i in range(4):
        r[i][i] = c[i]
    # rotate_half(x) = (-x2, x1): row i < 2 takes -x_{i+2}, row i >= 2 takes x_{i-2}
    for i in range(2):
        r[i][i + 2] = -s[i]
        r[i + 2][i] = s[i + 2]
    return r


def _ref_expected_attention(ctx, raw, offset, window, future, sinks, covariance, vnorm, epsilon):
    n, d, g = ctx.length, 4, ctx.groups
    out = [[[0.0] * n for _ in range(2)] for _ in range(2)]
    for b in range(2):
        win = [i for i in range(max(n - window, 0), n) if ctx.query_valid[b, i]]
        use = [i for i in win if int(ctx.position[b, 0, i]) >= sinks] or win
        p = offset[b] + max(i for i in range(n) if ctx.query_valid[b, i])  # last real query
        mats = [_rot_matrix(p + t) for t in range(1, future + 1)]
        rbar = [[sum(m[i][j] for m in mats) / future for j in range(d)] for i in range(d)]
        for hk in range(2):
            ea_heads = []
            for h in range(hk * g, (hk + 1) * g):
                qs = [[float(x) for x in raw[b, h, i]] for i in use]
                mu = [sum(q[c] for q in qs) / len(qs) for c in range(d)]
                cov = [[sum((q[i] - mu[i]) * (q[j] - mu[j]) for q in qs) / len(qs)
                        for j in range(d)] for i in range(d)]  # fmt: skip
                mub = [sum(rbar[i][j] * mu[j] for j in range(d)) for i in range(d)]
                covb = [[sum(rbar[i][a] * cov[a][c] * rbar[j][c] for a in range(d)
                             for c in range(d)) for j in range(d)] for i in range(d)]  # fmt: skip
                z = []
                for j in range(n):
                    k = [float(x) for x in ctx.keys[b, hk, j]]
                    if not ctx.valid[b, j] or int(ctx.position[b, hk, j]) < sinks:
                        z.append(-math.inf)
                        continue
                    zj = ctx.scale * sum(mub[i] * k[i] for i in range(d))
                    if covariance:
                        quad = sum(k[i] * covb[i][j2] * k[j2] for i in range(d) for j2 in range(d))
                        zj += 0.5 * ctx.scale**2 * quad
                    z.append(zj)
                if all(x == -math.inf for x in z):  # every real entry is a sink
                    ea_heads.append([0.0] * n)
                    continue
                m = max(z)
                e = [math.exp(x - m) if x > -math.inf else 0.0 for x in z]
                ea_heads.append([x / sum(e) for x in e])
            for j in range(n):
                if int(ctx.position[b, hk, j]) < sinks:
                    out[b][hk][j] = math.inf
                    continue
                s = sum(a[j] for a in ea_heads) / g + epsilon
                if vnorm:
                    s *= _norm(ctx.values[b, hk, j])
                out[b][hk][j] = s
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(window=6, future=5, sinks=2, covariance=True, vnorm=True, epsilon=0.01),
        dict(window=20, future=3, sinks=0, covariance=False, vnorm=False, epsilon=0.0),
        dict(window=2, future=7, sinks=11, covariance=True, vnorm=True, epsilon=0.0),
    ],
    ids=["default", "mean-only-all-queries", "window-all-sinks"],
)
def test_expected_attention_reference(kw):
    offset = (0, 5)
    ctx, raw = _ea_context(offset)
    s = get_method("expected_attention", **kw).score(ctx)
    want = _ref_expected_attention(ctx, raw, offset, **kw)
    for b in range(2):
        for h in range(2):
            for j in range(ctx.length):
                if not ctx.valid[b, j]:
                    continue
                w, got = want[b][h][j], float(s[b, h, j])
                assert got == w if math.isinf(w) else abs(got - w) < 1e-5 * max(1, abs(w)), (
                    b, h, j, got, w,
                )  # fmt: skip


def test_expected_attention_composed_rotation_is_the_rotation_at_p_plus_t():
    """``R_t R_p / f = R_{p+t}``, with RoPE rows at any offset (left padding)."""
    method = get_method("expected_attention", future=6)
    ctx, _ = _ea_context(offset=(3, 40))
    got = method.mean_rotation(ctx, torch.tensor([11, 11]))
    for b, p in enumerate((3 + 11, 40 + 11)):
        mats = [_rot_matrix(p + t) for t in range(1, 7)]
        for i in range(4):
            for j in range(4):
                want = sum(m[i][j] for m in mats) / 6
                assert abs(float(got[b, i, j]) - want) < 1e-5


def test_expected_attention_needs_the_rotary_embedding():
    ctx, _ = _ea_context()
    with pytest.raises(RuntimeError, match="rotary embedding"):
        get_method("expected_attention").score(dataclasses.replace(ctx, rope_fn=None))
    for bad in (dict(window=0), dict(future=0), dict(sinks=-1), dict(epsilon=-1.0)):
        with pytest.raises(ValueError):
            get_method("expected_attention", **bad)


def _yarn_llama():
    """The tiny Llama with YaRN RoPE (attention scaling f = cos at offset 0 != 1)."""
    cfg = tiny("llama").config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 128}  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.LlamaConfig(**cfg)
        return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("family", ["llama-yarn", "gemma3"])
@torch.no_grad()
def test_expected_attention_rotation_in_a_real_model(family):
    """The adapter's query rows and rope_fn compose to the model's own rotation at p + t
    (Gemma 3: each layer's own local or global RoPE)."""
    model = _yarn_llama() if family == "llama-yarn" else tiny("gemma3")
    n = 30 if family == "llama-yarn" else 10  # Gemma 3: its sliding layers hold it all
    ids, mask, _ = batch((n, n - 5), n=n)
    ctxs = {}
    method = get_method("expected_attention", ratio=0.0, future=8)
    with tm.patched(model, method), hd.observe(lambda c: ctxs.__setitem__(c.layer, c), evict=False):
        model(ids, attention_mask=mask, use_cache=True)
    assert sorted(ctxs) == [0, 1, 2, 3]
    from tokenmerge.methods.kv.expected_attention import rope_matrix

    rotations = []
    for ctx in ctxs.values():
        f = float(ctx.rope_fn(torch.tensor([0]))[0][0, 0])
        if family == "llama-yarn":
            assert abs(f - 1.0) > 0.01
        _, _, last = method.query_statistics(ctx)
        assert last.tolist() == [n - 1, n - 1]
        got = method.mean_rotation(ctx, last)
        # HF numbers positions 0..n-1 whatever the padding (no position_ids passed)
        cos, sin = ctx.rope_fn(torch.arange(n, n + 8))
        want = rope_matrix(cos.float(), sin.float()).mean(0)
        for b in range(2):
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)
        rotations.append(want)
    if family == "gemma3":  # local and global layers rotate differently
        assert not torch.allclose(rotations[0], rotations[1])


# --------------------------------------------------------------------------------------------
# TOVA: the scorer
# --------------------------------------------------------------------------------------------


def test_tova_reference():
    ctx, q = _context()
    s = get_method("tova").score(ctx)
    n, heads = ctx.length, 4
    for b in range(2):
        a = [_ref_attention(ctx, q, b, h, n - 1) for h in range(heads)]
        for hk in range(2):  # one score for every head
            for j in range(n):
                if ctx.valid[b, j]:
                    want = sum(a[h][j] for h in range(heads)) / heads
                    assert abs(float(s[b, hk, j]) - want) < 1e-6


def test_tova_uses_the_last_real_query():
    ctx, q = _context()
    qv = ctx.query_valid.clone()
    qv[0, -3:] = False  # sample 0's last three queries are padding (right padding)
    valid = ctx.valid.clone()
    valid[0, -3:] = False
    ctx = dataclasses.replace(ctx, query_valid=qv, valid=valid, _memo={})
    s = get_method("tova").score(ctx)
    for b, last in ((0, ctx.length - 4), (1, ctx.length - 1)):
        a = [_ref_attention(ctx, q, b, h, last) for h in range(4)]
        for j in range(ctx.length):
            if ctx.valid[b, j]:
                assert abs(float(s[b, 0, j]) - sum(x[j] for x in a) / 4) < 1e-6


# --------------------------------------------------------------------------------------------
# Real forwards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_generate_with_reduction_is_batch_independent(name):
    model = tiny("llama")
    lengths = (40, 26)
    ids, mask, _ = batch(lengths)
    with tm.patched(model, get_method(name, ratio=0.5)):
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for b, l in enumerate(lengths):
            one = model.generate(ids[b : b + 1, 40 - l :], attention_mask=mask[b : b + 1, 40 - l :],
                                 max_new_tokens=6, do_sample=False)  # fmt: skip
            assert torch.equal(one[0, -6:], together[b, -6:])


# --------------------------------------------------------------------------------------------
# TOVA while decoding, against a greedy loop written by hand over the unpatched model
# --------------------------------------------------------------------------------------------


def _manual_tova(model, ids, ratio, steps):
    """Greedy decoding of a Llama by hand, every layer keeping an explicit list of entries.

    The prefill is exact; after it each layer keeps the ``round(n (1 - ratio))`` entries
    most attended by the last prompt query (attention averaged over all query heads). Each
    decoding step attends to the kept entries plus the new one, then evicts the one its
    query attended to least. Returns the generated tokens and each layer's kept entries
    after every step (original indices)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    inner = model.model
    n = ids.shape[1]
    budget = round(n * (1 - ratio))
    keys, values, kept = {}, {}, {}
    history = []

    def head_mean(att_row):  # [H, L] -> python floats, mean over all query heads
        return [float(x) for x in att_row.mean(0)]

    def layer_pass(i, layer, h, pos, prefill):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        m = x.shape[1]
        q = a.q_proj(x).view(1, m, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(1, m, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(1, m, -1, a.head_dim).transpose(1, 2)
        cos, sin = inner.rotary_emb(h, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if prefill:
            keys[i], values[i] = k, v
            kept[i] = list(range(m))
        else:
            keys[i], values[i] = torch.cat([keys[i], k], 2), torch.cat([values[i], v], 2)
            kept[i] = kept[i] + [keys[i].shape[2] - 1]
        sel = torch.tensor(kept[i])
        kk = repeat_kv(keys[i][:, :, sel], a.num_key_value_groups)
        vv = repeat_kv(values[i][:, :, sel], a.num_key_value_groups)
        att = (q @ kk.transpose(-1, -2)) * a.scaling
        if prefill:
            att = att.masked_fill(~torch.ones(m, m, dtype=torch.bool).tril(), -math.inf)
        att = att.softmax(-1)
        o = (att @ vv).transpose(1, 2).reshape(1, m, -1)
        h = h + a.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        # TOVA: the current (last) query's attention over the entries, averaged over heads
        score = head_mean(att[0, :, -1])
        cap = budget if prefill else len(kept[i]) - 1
        order = sorted(range(len(kept[i])), key=lambda j: (-score[j], j))  # ties: earlier
        kept[i] = sorted(kept[i][j] for j in order[:cap])
        return h

    tokens = []
    x, pos = ids, torch.arange(n)[None]
    for step in range(steps + 1):
        h = inner.embed_tokens(x)
        for i, layer in enumerate(inner.layers):
            h = layer_pass(i, layer, h, pos, prefill=step == 0)
        nxt = int(model.lm_head(inner.norm(h))[0, -1].argmax())
        tokens.append(nxt)
        history.append({i: list(kept[i]) for i in kept})
        x, pos = torch.tensor([[nxt]]), torch.tensor([[n + step]])
    return tokens, history


@pytest.mark.parametrize("ratio", [0.5, 0.8])
@torch.no_grad()
def test_tova_decoding_matches_a_manual_greedy_loop(ratio):
    model = tiny("llama")
    ids = torch.randint(1, 100, (1, 30), generator=torch.Generator().manual_seed(8))
    steps = 8
    want_tokens, want_kept = _manual_tova(model, ids, ratio, steps)
    budget = round(30 * (1 - ratio))
    with tm.patched(model, get_method("tova", ratio=ratio)):
        gen = model.generate(ids, max_new_tokens=steps + 1, do_sample=False)
        assert gen[0, 30:].tolist() == want_tokens
        # the same steps by hand on the patched model: the cache after every forward
        out = model(ids, use_cache=True)
        cache = hd.cache_of(out)
        for step in range(steps + 1):
            for i in range(4):
                assert cache.stored(i) == budget  # held at the prefill's budget
                idx = cache.index[i][0]
                assert bool((idx >= 0).all())
                for h in range(idx.shape[0]):  # one set for every head
                    assert idx[h].tolist() == want_kept[step][i], (step, i, h)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            assert int(tok) == want_tokens[step]
            out = model(tok, **hd.cache_kw(model, cache))
    assert cache.seen == 30 + steps + 1


@torch.no_grad()
def test_tova_evicts_the_least_attended_entry_at_each_step():
    """Independently of the whole-model loop: at each decoding step the entry that leaves the
    cache is the argmin of the head-averaged attention of that step's query, recomputed from
    the keys the layer held and that step's post-RoPE query (captured from the model)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny("llama")
    ids = torch.randint(1, 100, (1, 24), generator=torch.Generator().manual_seed(9))
    layer = 2
    attn = model.model.layers[layer].self_attn
    seen = {}

    def grab(module, args, kwargs):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        q = attn.q_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
        seen["q"], seen["k"] = apply_rotary_pos_emb(q, k, cos, sin)

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with tm.patched(model, get_method("tova", ratio=0.5)):
            out = model(ids, use_cache=True)
            cache = hd.cache_of(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            for step in range(6):
                before = cache.index[layer][0, 0].tolist()
                held = cache.layers[layer].keys[0].clone()  # [H_kv, 12, d]
                out = model(tok, **hd.cache_kw(model, cache))
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                after = cache.index[layer][0, 0].tolist()
                cand = [*before, 24 + step]
                keys = torch.cat([held, seen["k"][0]], 1)  # the held entries plus the new one
                q = seen["q"][0, :, 0]  # [H, d]
                avg = [0.0] * len(cand)
                for h in range(4):
                    logits = [
                        float(q[h] @ keys[h // 2, j]) * attn.scaling for j in range(len(cand))
                    ]
                    m = max(logits)
                    e = [math.exp(x - m) for x in logits]
                    for j in range(len(cand)):
                        avg[j] += e[j] / sum(e) / 4
                worst = min(range(len(cand)), key=lambda j: (avg[j], -j))
                assert len(after) == 12
                assert sorted(set(cand) - set(after)) == [cand[worst]], step
    finally:
        handle.remove()
