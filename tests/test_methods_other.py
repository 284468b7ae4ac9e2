"""GTP, Token Transforming, pruning baselines, VisionZip, M3 and ATC against slow references.

Each reference below is written from the paper's equations with plain Python loops over one
sample; the implementation is called directly (``reduce``) on small random inputs and must
give the same output tokens, sizes and positions. Invariants (sizes, constant input, protected
tokens, batch independence, padding) follow.
"""

from __future__ import annotations

import math

import pytest
import torch
from models import images, make

import tokenmerge as tm
from tokenmerge.core import CostModel, Reduction, Signals, TokenState
from tokenmerge.methods.atc import ATC
from tokenmerge.methods.gtp import GTP
from tokenmerge.methods.m3 import M3, PoolAt
from tokenmerge.methods.pruning import EViT, RandomPrune
from tokenmerge.methods.token_transforming import TokenTransforming
from tokenmerge.methods.visionzip import VisionZip

F64 = torch.float64


# ------------------------------------------------------------------------------ fixtures
def setup(seed, b=2, n_prefix=1, grid=(3, 4), heads=2, d=4, c=5, sizes=True):
    """Random tokens, queries, keys and sizes, with ``n_prefix`` protected prefix tokens."""
    g = torch.Generator().manual_seed(seed)
    n = n_prefix + grid[0] * grid[1]
    x = torch.randn(b, n, c, generator=g, dtype=F64)
    q = torch.randn(b, heads, n, d, generator=g, dtype=F64)
    k = torch.randn(b, heads, n, d, generator=g, dtype=F64)
    size = torch.randint(1, 4, (b, n), generator=g).to(F64) if sizes else None
    prot = torch.zeros(b, n, dtype=torch.bool)
    prot[:, :n_prefix] = True
    state = TokenState.start(x, prot, size=size, grid=grid, n_prefix=n_prefix)
    return Signals(x=x, k=k, q=q, scale=d**-0.5), state


def outputs(red: Reduction, sig: Signals, state: TokenState):
    """Output features, sizes and original positions of the representatives."""
    y, s = red.apply(sig.x, state.size)
    return y, s, state.pos.gather(1, red.rep)


def check(ref, y, s, pos, bi):
    """Compare one sample's reference ``[(position, feature, size), ...]`` with the output."""
    ref = sorted(ref, key=lambda t: t[0])
    keep = s[bi] > 0
    assert pos[bi][keep].tolist() == [p for p, _, _ in ref]
    torch.testing.assert_close(y[bi][keep], torch.stack([f for _, f, _ in ref]))
    torch.testing.assert_close(s[bi][keep], torch.tensor([z for _, _, z in ref], dtype=F64))


def sizes_of(state, bi):
    return [1.0] * state.pos.shape[1] if state.size is None else state.size[bi].tolist()


# ------------------------------------------------------------------------------ plain maths
def dot(a, b):
    return sum(float(u) * float(v) for u, v in zip(a, b, strict=True))


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def attention(q, k, scale):
    """``A[h][i][j] = softmax_j(q_hi · k_hj · scale)`` with loops."""
    heads, n = q.shape[0], q.shape[1]
    out = []
    for h in range(heads):
        rows = []
        for i in range(n):
            logits = [dot(q[h, i], k[h, j]) * scale for j in range(n)]
            mx = max(logits)
            e = [math.exp(v - mx) for v in logits]
            rows.append([v / sum(e) for v in e])
        out.append(rows)
    return out


def cls_attention(q, k, scale):
    a = attention(q, k, scale)
    return [sum(a[h][0][i] for h in range(len(a))) / len(a) for i in range(q.shape[1])]


def key_metric(k):
    """ToMe's metric for one sample: keys averaged over heads, ``[N, d]``."""
    return [sum(k[h, i] for h in range(k.shape[0])) / k.shape[0] for i in range(k.shape[1])]


def ascending(score, idx):
    """Indices ``idx`` sorted by score, ties by index (a stable sort)."""
    return sorted(idx, key=lambda i: (score[i], i))


def wmean(pairs):
    """``(Σ w x / Σ w, Σ w)`` for ``pairs = [(w, x), ...]``."""
    tot = sum(w for w, _ in pairs)
    return sum(w * x for w, x in pairs) / tot, tot


# ------------------------------------------------------------------------------ references
def ref_evit(x, size, q, k, scale, n_prefix, r, fuse):
    n = len(x)
    a = cls_attention(q, k, scale)
    cand = list(range(n_prefix, n))
    order = ascending(a, cand)
    gone = order[: r + 1] if fuse else order[:r]
    out = [(i, x[i], size[i]) for i in range(n) if i not in gone]
    if fuse:
        rep = max(gone, key=lambda i: (a[i], -i))
        f, _ = wmean([(a[i] * size[i], x[i]) for i in gone])
        out.append((rep, f, sum(size[i] for i in gone)))
    return out


def ref_graph(feats, pos, nodes, grid, n_prefix, neighbours, kind):
    """GTP's normalised graph ``{(i, j): Â_ij}`` over original positions."""
    w = grid[1]

    def rc(p):
        return divmod(p - n_prefix, w)

    g = {}
    for i in nodes:
        knn = []
        if kind in ("semantic", "mixed"):
            others = sorted(
                (j for j in nodes if j != i),
                key=lambda j: -cos(feats[pos.index(i)], feats[pos.index(j)]),
            )
            knn = others[:neighbours]
        for j in nodes:
            if i == j:
                continue
            (ri, ci), (rj, cj) = rc(i), rc(j)
            spatial = kind in ("spatial", "mixed") and abs(ri - rj) <= 1 and abs(ci - cj) <= 1
            g[i, j] = 1.0 if spatial or j in knn else 0.0
    deg = {i: sum(g[i, j] for j in nodes if j != i) for i in nodes}
    return {
        (i, j): g[i, j] / math.sqrt(deg[i] * deg[j]) if g[i, j] else 0.0
        for i in nodes
        for j in nodes
        if i != j
    }


def ref_gtp(x, size, q, k, scale, pos, prot, graph, r, alpha):
    """One GTP step on tokens at original positions ``pos``; ``graph`` from :func:`ref_graph`."""
    n = len(x)
    a = attention(q, k, scale)
    heads = len(a)
    regen = [max(a[h][i][i] for h in range(heads)) for i in range(n)]
    bcast = [max(sum(a[h][j][i] for j in range(n)) for h in range(heads)) for i in range(n)]
    score = [regen[i] * bcast[i] for i in range(n)]
    cand = [i for i in range(n) if not prot[i]]
    prop = ascending(score, cand)[:r]
    out = []
    for t in range(n):
        if t in prop:
            continue
        f, s = x[t].clone(), size[t]
        if not prot[t]:
            for p in prop:
                wt = graph.get((pos[t], pos[p]), 0.0)
                f = f + alpha * wt * x[p]
                s = s + alpha * wt * size[p]
        out.append((pos[t], f, s))
    return out


def ref_tt(x, size, q, k, scale, n_prefix, r, kk, tau, weights, imp):
    n = len(x)
    m = key_metric(k)
    cand = list(range(n_prefix, n))
    if imp == "cls":
        score = cls_attention(q, k, scale)
    elif imp == "keynorm":
        score = [
            -sum(math.sqrt(dot(k[h, i], k[h, i])) for h in range(k.shape[0])) / k.shape[0]
            for i in range(n)
        ]
    else:
        score = [0.0] * n
        for i in cand:
            score[i] = -max(cos(m[i], m[j]) for j in cand if j != i)
    src = ascending(score, cand)[:r]
    tgt = [i for i in cand if i not in src]
    acc = {t: [(size[t], x[t])] for t in tgt}
    for i in src:
        near = sorted(tgt, key=lambda t: (-cos(m[i], m[t]), t))[:kk]
        c = [cos(m[i], m[t]) for t in near]
        if weights == "softmax":
            e = [math.exp((v - max(c)) / tau) for v in c]
            w = [v / sum(e) for v in e]
        else:
            p = [max(v, 0.0) for v in c]
            w = [v / sum(p) for v in p] if sum(p) > 0 else [1.0] + [0.0] * (len(p) - 1)
        for t, wt in zip(near, w, strict=True):
            acc[t].append((wt * size[i], x[i]))
    out = [(i, x[i], size[i]) for i in range(n_prefix)]
    out += [(t, *wmean(acc[t])) for t in tgt]
    return out


def ref_visionzip(x, size, q, k, scale, n_prefix, r, ratio, merge):
    n = len(x)
    a = cls_attention(q, k, scale)
    m = key_metric(k)
    cand = list(range(n_prefix, n))
    kept = len(cand) - r
    c = min(max(round(kept * ratio), 1), kept)
    dom = sorted(cand, key=lambda i: (-a[i], i))[: kept - c]
    rest = [i for i in cand if i not in dom]
    step = max(1, len(rest) // c)
    ctx = rest[::step][:c]
    members = {t: [] for t in ctx}
    for i in rest:
        if i not in ctx:
            best = max(ctx, key=lambda t: (cos(m[i], m[t]), -t))
            members[best].append(i)
    out = [(i, x[i], size[i]) for i in list(range(n_prefix)) + dom]
    for t in ctx:
        mem = members[t]
        if merge == "mean":
            out.append((t, *wmean([(size[i], x[i]) for i in [t, *mem]])))
        elif mem:
            mx = sum(x[i] for i in mem) / len(mem)
            out.append((t, x[t] + mx, size[t] + sum(size[i] for i in mem) / len(mem)))
        else:
            out.append((t, x[t], size[t]))
    return out


def ref_m3(x, size, grid, n_prefix, side):
    w = grid[1]
    cells = {}
    for i in range(n_prefix, len(x)):
        row, col = divmod(i - n_prefix, w)
        cells.setdefault((row // side, col // side), []).append(i)
    out = [(i, x[i], size[i]) for i in range(n_prefix)]
    for mem in cells.values():
        out.append((min(mem), *wmean([(size[i], x[i]) for i in mem])))
    return out


def ref_atc(x, size, k, n_prefix, r, linkage):
    m = key_metric(k)
    d = {(i, j): 1.0 - cos(m[i], m[j]) for i in range(len(x)) for j in range(len(x))}
    clusters = [[i] for i in range(n_prefix, len(x))]

    def link(a_, b_):
        ds = [d[i, j] for i in a_ for j in b_]
        if linkage == "average":
            return sum(ds) / len(ds)
        return max(ds) if linkage == "complete" else min(ds)

    for _ in range(r):
        best = None
        for u in range(len(clusters)):
            for v in range(u + 1, len(clusters)):
                dist = link(clusters[u], clusters[v])
                if best is None or dist < best[0]:
                    best = (dist, u, v)
        _, u, v = best
        clusters[u] = sorted(clusters[u] + clusters[v])
        del clusters[v]
        clusters.sort()
    out = [(i, x[i], size[i]) for i in range(n_prefix)]
    for cl in clusters:
        out.append((cl[0], *wmean([(size[i], x[i]) for i in cl])))
    return out


# ------------------------------------------------------------------------------ reference tests
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_reference(seed, fuse):
    sig, st = setup(seed, n_prefix=2)
    r = 3 + seed
    red = EViT(fuse=fuse).reduce(sig, st, r, 0)
    y, s, pos = outputs(red, sig, st)
    for bi in range(2):
        ref = ref_evit(sig.x[bi], sizes_of(st, bi), sig.q[bi], sig.k[bi], sig.scale, 2, r, fuse)
        check(ref, y, s, pos, bi)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["mixed", "spatial", "semantic"])
def test_gtp_matches_reference_over_two_layers(seed, kind):
    sig, st = setup(seed, n_prefix=1, grid=(4, 4))
    gtp = GTP(alpha=0.3, neighbours=3, graph=kind)
    n0, pre = sig.x.shape[1], 1
    graphs = [
        ref_graph(sig.x[bi], list(range(n0)), list(range(pre, n0)), (4, 4), pre, 3, kind)
        for bi in range(2)
    ]
    g = torch.Generator().manual_seed(100 + seed)
    for layer, r in enumerate([3, 4]):
        red = gtp.reduce(sig, st, r, layer)
        assert red.mode == "sum"
        y, s, pos = outputs(red, sig, st)
        for bi in range(2):
            ref = ref_gtp(
                sig.x[bi],
                sizes_of(st, bi),
                sig.q[bi],
                sig.k[bi],
                sig.scale,
                st.pos[bi].tolist(),
                st.protected[bi].tolist(),
                graphs[bi],
                r,
                0.3,
            )
            check(ref, y, s, pos, bi)
        # next layer: the reduced tokens with fresh queries and keys; the graph is reused
        x = st.reduce(sig.x, red)
        nn_ = x.shape[1]
        sig = Signals(
            x=x,
            k=torch.randn(2, 2, nn_, 4, generator=g, dtype=F64),
            q=torch.randn(2, 2, nn_, 4, generator=g, dtype=F64),
            scale=0.5,
        )
    assert "gtp" in st.cache


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "kk,tau,weights,imp",
    [
        (1, 0.1, "softmax", "cls"),
        (3, 0.1, "softmax", "cls"),
        (4, 0.5, "softmax", "keynorm"),
        (2, 0.05, "softmax", "tome"),
        (3, 0.1, "cosine", "cls"),
    ],
)
def test_token_transforming_matches_reference(seed, kk, tau, weights, imp):
    sig, st = setup(seed, n_prefix=1)
    r = 4 + seed
    method = TokenTransforming(k=kk, temperature=tau, weights=weights, importance=imp)
    red = method.reduce(sig, st, r, 0)
    y, s, pos = outputs(red, sig, st)
    for bi in range(2):
        ref = ref_tt(
            sig.x[bi],
            sizes_of(st, bi),
            sig.q[bi],
            sig.k[bi],
            sig.scale,
            1,
            r,
            kk,
            tau,
            weights,
            imp,
        )
        check(ref, y, s, pos, bi)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("merge", ["mean", "add"])
@pytest.mark.parametrize("r,ratio", [(3, 10 / 64), (7, 0.3), (10, 0.5)])
def test_visionzip_matches_reference(seed, merge, r, ratio):
    sig, st = setup(seed, n_prefix=1, grid=(3, 5))
    red = VisionZip(contextual_ratio=ratio, merge=merge).reduce(sig, st, r, 0)
    y, s, pos = outputs(red, sig, st)
    for bi in range(2):
        ref = ref_visionzip(
            sig.x[bi], sizes_of(st, bi), sig.q[bi], sig.k[bi], sig.scale, 1, r, ratio, merge
        )
        check(ref, y, s, pos, bi)


@pytest.mark.parametrize("grid,side,n_prefix", [((4, 4), 2, 1), ((5, 7), 3, 2), ((6, 6), 4, 0)])
def test_m3_matches_reference(grid, side, n_prefix):
    sig, st = setup(3, n_prefix=n_prefix, grid=grid)
    red = M3(r=side).reduce(sig, st, side, 3)
    y, s, pos = outputs(red, sig, st)
    for bi in range(2):
        check(ref_m3(sig.x[bi], sizes_of(st, bi), grid, n_prefix, side), y, s, pos, bi)


def avg_pool(x, n_prefix, grid, side):
    img = x[:, n_prefix:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
    return torch.nn.functional.avg_pool2d(img, side).flatten(2).transpose(1, 2)


def test_m3_equals_avg_pool2d_at_unit_sizes():
    for side in (2, 4, 8):
        sig, st = setup(4, n_prefix=1, grid=(8, 8), sizes=False)
        red = M3(r=side).reduce(sig, st, side, 3)
        y, s = red.apply(sig.x, None)
        torch.testing.assert_close(y[:, 1:], avg_pool(sig.x, 1, (8, 8), side))
        torch.testing.assert_close(y[:, :1], sig.x[:, :1])
        assert s[:, 1:].eq(side * side).all() and red.n_out == 1 + (8 // side) ** 2


def test_m3_nests_pooling_across_layers():
    sig, st = setup(6, n_prefix=2, grid=(8, 8), sizes=False)
    x0 = sig.x
    for layer, expect in [(2, 2), (5, 4), (7, 8)]:  # cumulative sides 2, 4, 8
        red = M3(r=[0] * 12).reduce(sig, st, 2, layer)
        x = st.reduce(sig.x, red)
        torch.testing.assert_close(x[:, 2:], avg_pool(x0, 2, (8, 8), expect))
        torch.testing.assert_close(x[:, :2], x0[:, :2])
        sig = Signals(x=x, k=torch.zeros(2, 2, x.shape[1], 4, dtype=F64))
    assert st.size[:, 2:].eq(64).all()


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_atc_matches_reference(linkage):
    # many merges, so that clusters of several tokens meet again (where linkages differ)
    for seed in range(5):
        sig, st = setup(seed, n_prefix=1, grid=(4, 4))
        for r in (4, 8, 11, 14):
            red = ATC(linkage=linkage).reduce(sig, st, r, 0)
            y, s, pos = outputs(red, sig, st)
            for bi in range(2):
                ref = ref_atc(sig.x[bi], sizes_of(st, bi), sig.k[bi], 1, r, linkage)
                check(ref, y, s, pos, bi)


def test_random_prune_is_uniform_seeded_and_exact():
    sig, st = setup(0, n_prefix=2, grid=(3, 4))
    r, counts = 3, torch.zeros(sig.x.shape[1])
    for layer in range(400):
        red = RandomPrune(seed=7).reduce(sig, st, r, layer)
        assert red.selection and red.n_out == sig.x.shape[1] - r
        kept = torch.zeros(2, sig.x.shape[1], dtype=torch.bool).scatter_(1, red.rep, True)
        assert kept[:, :2].all()  # protected prefix kept
        # the same draw for every sample holding the same tokens: batch independence
        assert torch.equal(kept[0], kept[1])
        counts += (~kept[0]).double()
        y, _ = red.apply(sig.x, st.size)
        torch.testing.assert_close(y, sig.x.gather(1, red.rep[..., None].expand(-1, -1, 5)))
    assert counts[:2].eq(0).all()
    expect = 400 * r / 12  # 100 per unprotected token; binomial sd ~ 8.7
    assert ((counts[2:] - expect).abs() < 40).all(), counts
    again = RandomPrune(seed=7).reduce(sig, st, r, 5).rep
    assert torch.equal(again, RandomPrune(seed=7).reduce(sig, st, r, 5).rep)
    other = [RandomPrune(seed=s).reduce(sig, st, r, 5).rep for s in range(8)]
    assert len({tuple(o[0].tolist()) for o in other}) > 1


# ------------------------------------------------------------------------------ invariants
def every_method():
    return [
        RandomPrune(),
        EViT(),
        EViT(fuse=True),
        GTP(),
        TokenTransforming(),
        TokenTransforming(importance="tome", k=2),
        VisionZip(),
        VisionZip(merge="add"),
        ATC(),
        ATC(linkage="complete"),
    ]


MEAN_MODE = (EViT, TokenTransforming, VisionZip, ATC)


def conserving(m):
    return isinstance(m, MEAN_MODE) and not (
        (isinstance(m, EViT) and not m.fuse) or (isinstance(m, VisionZip) and m.merge == "add")
    )


@pytest.mark.parametrize("method", [*every_method(), M3(r=2)], ids=repr)
def test_sizes_constant_input_and_protected_tokens(method):
    sig, st = setup(5, n_prefix=3, grid=(4, 4))
    r = 2 if isinstance(method, M3) else 6
    red = method.reduce(sig, st, r, 0)
    y, s = red.apply(sig.x, st.size)
    n_out = int((s > 0).sum(1)[0])
    expected = 3 + 4 if isinstance(method, M3) else sig.x.shape[1] - r
    assert n_out == expected and bool((s > 0).sum(1).eq(n_out).all())
    # protected tokens are untouched, in front, at their own positions
    torch.testing.assert_close(y[:, :3], sig.x[:, :3])
    torch.testing.assert_close(s[:, :3], st.size[:, :3])
    assert torch.equal(st.pos.gather(1, red.rep)[:, :3], torch.arange(3).expand(2, 3))
    if conserving(method) or isinstance(method, M3):
        torch.testing.assert_close(s.sum(1), st.size.sum(1))
        const = torch.randn(5, dtype=F64).expand_as(sig.x)
        yc, _ = red.apply(const, st.size)
        torch.testing.assert_close(yc, const[:, : red.n_out])
    else:
        assert bool((s.sum(1) < st.size.sum(1)).all())


def padded_batch(seed, lengths, n_prefix=1):
    """Two samples, the shorter one padded at the end (size 0), as a padded text batch."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    b, heads, d, c = len(lengths), 2, 4, 5
    x = torch.randn(b, n, c, generator=g, dtype=F64)
    q = torch.randn(b, heads, n, d, generator=g, dtype=F64)
    k = torch.randn(b, heads, n, d, generator=g, dtype=F64)
    size = torch.randint(1, 4, (b, n), generator=g).to(F64)
    for i, length in enumerate(lengths):
        size[i, length:] = 0
    prot = torch.zeros(b, n, dtype=torch.bool)
    prot[:, :n_prefix] = True
    return x, q, k, size, prot


def run_one(method, x, q, k, size, prot, r, n_prefix=1):
    st = TokenState.start(x, prot, size=size, n_prefix=n_prefix)
    # what the patch passes before the first reduction of a padded batch: padding hidden
    sig = Signals(x=x, k=k, q=q, scale=0.5, bias=st.attn_bias(False, x.dtype))
    red = method.reduce(sig, st, r, 2)
    return red.apply(x, st.size)


@pytest.mark.parametrize("method", every_method(), ids=repr)
def test_per_sample_budgets_padding_and_batch_independence(method):
    lengths, rs = [14, 10], [5, 3]
    x, q, k, size, prot = padded_batch(11, lengths)
    y, s = run_one(method, x, q, k, size, prot, torch.tensor(rs))
    # the content of the padding never matters, however loud it is
    pad = size == 0
    g = torch.Generator().manual_seed(12)
    x2, q2, k2 = (t.clone() for t in (x, q, k))
    x2[pad] = 10 * torch.randn(x2[pad].shape, generator=g, dtype=F64)
    q2.transpose(1, 2)[pad] = 10 * torch.randn(
        q2.transpose(1, 2)[pad].shape, generator=g, dtype=F64
    )
    k2.transpose(1, 2)[pad] = 10 * torch.randn(
        k2.transpose(1, 2)[pad].shape, generator=g, dtype=F64
    )
    y2, s2 = run_one(method, x2, q2, k2, size, prot, torch.tensor(rs))
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(s2, s)
    for i, (length, r) in enumerate(zip(lengths, rs, strict=True)):
        cut = slice(i, i + 1), slice(0, length)
        yi, si = run_one(
            method,
            x[cut],
            q[cut[0], :, cut[1]],
            k[cut[0], :, cut[1]],
            size[cut],
            prot[cut],
            r,
        )
        keep = s[i] > 0
        assert int(keep.sum()) == length - r == int((si > 0).sum())
        torch.testing.assert_close(y[i][keep], yi[0][si[0] > 0])
        torch.testing.assert_close(s[i][keep], si[0][si[0] > 0])


# ------------------------------------------------------------------------------ on models
MODEL_METHODS = [
    RandomPrune(r=6),
    EViT(r=6),
    GTP(r=6),
    TokenTransforming(r=6),
    VisionZip(r=6),
    ATC(r=6),
    M3(r=2, layer=1),
    M3(r=[0, 2, 2]),
]


@pytest.mark.parametrize("method", MODEL_METHODS, ids=lambda m: f"{m.name}-{m.r}")
@torch.no_grad()
def test_on_model_counts_and_batch_independence(method):
    model, run = make("timm-dinov2-like")  # CLS + 4 registers + 8x8 patches, 3 blocks
    x = images(3)
    with tm.patched(model, method):
        together = run(model, x)
        counts = [int(c[0]) for c in tm.state(model).tokens_per_layer]
        alone = torch.cat([run(model, x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    if isinstance(method, M3):
        assert counts == [69, 5 + 16, 5 + 16] if method.r == 2 else [69, 5 + 16, 5 + 4]
    else:
        assert counts == [63, 57, 51]


@torch.no_grad()
def test_no_cls_model_ranks_by_attention_received():
    model, run = make("timm-avgpool")  # no prefix token at all
    with tm.patched(model, EViT(r=8)):
        run(model, images(2))
        st = tm.state(model)
    assert [int(c[0]) for c in st.tokens_per_layer] == [56, 48, 40]


def test_m3_budget_errors():
    with pytest.raises(ValueError, match="pooling side"):
        M3(r=(4, -0.5))
    with pytest.raises(ValueError, match="pooling side"):
        M3(r=tm.KeepRatio(0.5))
    model, run = make("timm-avgpool")
    with pytest.raises(ValueError, match="out of range"), tm.patched(model, M3(r=2, layer=5)):
        run(model, images(1))
    assert M3(r=tm.Constant(4)).budget == PoolAt(4, None)
    assert M3(r=4, layer=-2).budget.schedule(65, 1, CostModel(3, 8, 8), None) == [0, 4, 0]
    assert M3(r=2).budget.schedule(65, 1, CostModel(12, 8, 8), None)[6] == 2  # middle block
    assert M3(r=1).budget.is_zero


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="graph"):
        GTP(graph="knn")
    with pytest.raises(ValueError, match="importance"):
        TokenTransforming(importance="random")
    with pytest.raises(ValueError, match="temperature"):
        TokenTransforming(temperature=0.0)
    with pytest.raises(ValueError, match="merge"):
        VisionZip(merge="sum")
    with pytest.raises(ValueError, match="linkage"):
        ATC(linkage="ward")
