"""Projector-site methods (tokenmerge.methods.projector): each one against a slow reference
written here from its paper's equations (Python loops over one image's tokens), plus the
properties every registered projector method must have: exact counts, protected tokens
untouched, padding dropped, batch independence, identity at ``keep == n``, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenmerge.methods.base import REGISTRY
from tokenmerge.methods.projector import (
    DART,
    PROJECTOR_METHODS,
    VIDEO_METHODS,
    AIMMerge,
    DivPrune,
    DownsampleProj,
    M3Proj,
    RandomProj,
    RecoverableCompression,
    VisionZipProj,
    VisualTokens,
)
from tokenmerge.methods.projector.random_proj import mix64

ALL_PROJECTOR = sorted(n for n, c in REGISTRY.items() if c.site == "projector")
#: the image methods (the video-only ones are tested on clips in test_vlm_video.py)
PROJECTOR = [n for n in ALL_PROJECTOR if not REGISTRY[n].video_only]
DIM = 6


# ----------------------------------------------------------------------------- layouts
def layout(parts: list[tuple[int, int, bool]]) -> tuple[list, list, list]:
    """One image's token layout: per part ``(rows, cols, newline)``; with ``newline`` every
    grid row ends in a protected token (LLaVA-NeXT's tiles). Returns per token ``(row, col)``,
    part and protected."""
    coord, part, prot = [], [], []
    for p, (rows, cols, newline) in enumerate(parts):
        for r in range(rows):
            for c in range(cols):
                coord.append((r, c))
                part.append(p)
                prot.append(False)
            if newline:
                coord.append((-1, -1))
                part.append(-1)
                prot.append(True)
    return coord, part, prot


#: LLaVA-1.5-like grids, and LLaVA-NeXT-like: a base grid plus tiles with row-end newlines
LAYOUTS = [
    [(5, 5, False)],
    [(3, 3, False), (4, 6, True)],
    [(4, 3, False)],
    [(2, 2, False), (3, 5, True)],
]


def batch(layouts: list, seed: int = 0, pad: int = 0, dup: bool = True) -> VisualTokens:
    """Visual tokens of several images (one per row, right-padded, ``pad`` extra slots), with
    random features (some near duplicates), saliency and question text."""
    g = torch.Generator().manual_seed(seed)
    rows = [layout(lay) for lay in layouts]
    u, n = len(rows), max(len(r[0]) for r in rows) + pad
    n_parts = max(len(lay) for lay in layouts)
    x = torch.randn(u, n, DIM, generator=g)
    if dup:  # near duplicates, so that similarity-based rules have structure to find
        src = torch.randint(0, n, (u, n), generator=g)
        near = torch.rand(u, n, generator=g) < 0.3
        x = torch.where(near[..., None], x.gather(1, src[..., None].expand(-1, -1, DIM)), x)
        x = x + 0.05 * torch.randn(u, n, DIM, generator=g)
    valid = torch.zeros(u, n, dtype=torch.bool)
    prot = torch.zeros(u, n, dtype=torch.bool)
    coord = torch.full((u, n, 2), -1, dtype=torch.long)
    part = torch.full((u, n), -1, dtype=torch.long)
    grid = torch.zeros(u, n_parts, 2, dtype=torch.long)
    for i, ((co, pa, pr), lay) in enumerate(zip(rows, layouts, strict=True)):
        k = len(co)
        valid[i, :k] = True
        prot[i, :k] = torch.tensor(pr)
        coord[i, :k] = torch.tensor(co)
        part[i, :k] = torch.tensor(pa)
        for p, (r, c, _) in enumerate(lay):
            grid[i, p] = torch.tensor([r, c])
    t = 4
    text_valid = torch.arange(t)[None, :] < torch.randint(1, t + 1, (u, 1), generator=g)
    return VisualTokens(
        x=x.masked_fill(~valid[..., None], 0.0),
        valid=valid,
        protected=prot,
        coord=coord,
        part=part,
        grid=grid,
        saliency=torch.rand(u, n, generator=g).masked_fill(~valid, 0.0),
        text=torch.randn(u, t, DIM, generator=g),
        text_valid=text_valid,
    )


def row_of(v: VisualTokens, i: int, pad: int = 0) -> VisualTokens:
    """Image ``i`` of ``v`` alone, trimmed to its tokens plus ``pad`` padding slots."""
    n = int(v.valid[i].sum()) + pad

    def cut(t, fill):
        t = t[i : i + 1, : min(n, t.shape[1])]
        if t.shape[1] < n:
            extra = t.new_full((1, n - t.shape[1], *t.shape[2:]), fill)
            t = torch.cat([t, extra], 1)
        return t

    return VisualTokens(
        x=cut(v.x, 0),
        valid=cut(v.valid, False),
        protected=cut(v.protected, False),
        coord=cut(v.coord, -1),
        part=cut(v.part, -1),
        grid=v.grid[i : i + 1],
        saliency=cut(v.saliency, 0),
        text=v.text[i : i + 1],
        text_valid=v.text_valid[i : i + 1],
    )


def outputs(red, x: torch.Tensor, i: int) -> tuple[list[int], torch.Tensor]:
    """Image ``i``'s outputs: representatives and features (padding slots left out)."""
    y, size = red.apply(x)
    real = size[i] > 0
    return red.rep[i][real].tolist(), y[i][real]


def check(red, v: VisualTokens, ref: dict, tol: float = 1e-5) -> None:
    """Compare the reduction of every image with ``ref[i] = {rep: feature}``."""
    for i, want in ref.items():
        reps, y = outputs(red, v.x, i)
        assert reps == sorted(want), (i, reps, sorted(want))
        exp = torch.stack([want[r] for r in sorted(want)])
        torch.testing.assert_close(y, exp, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- references
def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / max(float(a.norm() * b.norm()), 1e-12))


def cands(v: VisualTokens, i: int) -> list[int]:
    return [j for j in range(v.x.shape[1]) if v.valid[i, j] and not v.protected[i, j]]


def kept_protected(v: VisualTokens, i: int) -> dict:
    return {j: v.x[i, j] for j in range(v.x.shape[1]) if v.protected[i, j]}


def by_score(score, idx: list[int], k: int, largest: bool = True) -> list[int]:
    """The ``k`` best of ``idx`` by ``score`` (ties: the lower index)."""
    sign = -1 if largest else 1
    return sorted(idx, key=lambda j: (sign * float(score[j]), j))[:k]


def ref_contextual(x, rest: list[int], c: int, drop: bool) -> dict:
    """VisionZip's contextual step: evenly spaced targets, nearest by cosine, mean."""
    if c == 0:
        return {}
    step = max(1, len(rest) // c)
    ctx = [t for j, t in enumerate(rest) if j % step == 0 and j // step < c]
    groups = {t: [] for t in ctx}
    for i in rest:
        if i not in groups:
            best = max(ctx, key=lambda t: (cos(x[i], x[t]), -t))
            groups[best].append(i)
    return groups


def ref_visionzip(v, keep, ratio=10 / 64, merge="mean") -> dict:
    out = {}
    for i in range(v.x.shape[0]):
        cand, k = cands(v, i), int(keep[i])
        c = round(k * ratio)
        c = min(max(c, 1) if k >= 2 else c, k)
        dom = by_score(v.saliency[i], cand, k - c)
        rest = [j for j in cand if j not in dom]
        res = {j: v.x[i, j] for j in dom} | kept_protected(v, i)
        for t, members in ref_contextual(v.x[i], rest, c, True).items():
            xs = v.x[i, [t, *members]]
            if merge == "mean":
                res[t] = xs.mean(0)
            else:
                res[t] = xs[0] + (xs[1:].mean(0) if members else 0)
        out[i] = res
    return out


def ref_m3(v, keep, scales="pow2") -> dict:
    out = {}
    for i in range(v.x.shape[0]):
        grids = [tuple(map(int, g)) for g in v.grid[i] if int(g[0]) > 0]
        top = max(max(g) for g in grids)
        sides = [2**e for e in range(12)] if scales == "pow2" else list(range(1, top + 1))
        count = {s: sum(math.ceil(r / s) * math.ceil(c / s) for r, c in grids) for s in sides}
        ok = [s for s in sides if count[s] <= int(keep[i])]
        s = ok[0] if ok else sides[-1]
        cells: dict = {}
        for j in cands(v, i):
            r, c = map(int, v.coord[i, j])
            p = int(v.part[i, j])
            cells.setdefault((p, r // s, c // s), []).append((r * grids[p][1] + c, j))
        res = kept_protected(v, i)
        for members in cells.values():
            rep = min(members)[1]
            res[rep] = v.x[i, [j for _, j in members]].mean(0)
        out[i] = res
    return out


def ref_downsample(v, keep) -> dict:
    """Each part's grid through F.adaptive_avg_pool2d; the representative is the input at the
    window's centre (lower on a tie)."""
    out = {}
    for i in range(v.x.shape[0]):
        cand = cands(v, i)
        f = math.sqrt(int(keep[i]) / len(cand))
        res = kept_protected(v, i)
        for p, (rows, cols) in enumerate(v.grid[i].tolist()):
            if rows == 0:
                continue
            where = {}
            img = torch.zeros(DIM, rows, cols)
            for j in cand:
                if int(v.part[i, j]) == p:
                    r, c = map(int, v.coord[i, j])
                    img[:, r, c] = v.x[i, j]
                    where[(r, c)] = j
            ro = min(max(1, round(rows * f)), rows)
            co = min(max(1, round(cols * f)), cols)
            pooled = F.adaptive_avg_pool2d(img[None], (ro, co))[0]
            for a in range(ro):
                r0, r1 = (a * rows) // ro, -((-(a + 1) * rows) // ro)
                for b in range(co):
                    c0, c1 = (b * cols) // co, -((-(b + 1) * cols) // co)
                    res[where[((r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2)]] = pooled[:, a, b]
        out[i] = res
    return out


def ref_aim(v, keep) -> dict:
    """Bipartite merging repeated until ``keep``: alternate A/B over the survivors in token
    order, each A token's most similar B token, the strongest ``min(m - keep, m // 2)`` edges
    merge; features are the means of the original tokens in a group."""
    out = {}
    for i in range(v.x.shape[0]):
        groups = {j: [j] for j in cands(v, i)}
        x = v.x[i]

        def mean(t, x=x, groups=groups):
            return x[groups[t]].mean(0)

        while len(groups) > int(keep[i]):
            alive = sorted(groups)
            r = min(len(alive) - int(keep[i]), len(alive) // 2)
            a_set, b_set = alive[0::2], alive[1::2]
            edges = []
            for a in a_set:
                best = max(b_set, key=lambda b: (cos(mean(a), mean(b)), -b))
                edges.append((-cos(mean(a), mean(best)), a, best))
            for _, a, b in sorted(edges)[:r]:
                groups[b] = groups[b] + groups.pop(a)
        out[i] = {t: mean(t) for t in groups} | kept_protected(v, i)
    return out


def ref_dart(v, keep, pivots=8, assign="groups") -> dict:
    out = {}
    for i in range(v.x.shape[0]):
        cand, k = cands(v, i), int(keep[i])
        p = min(max(1, round(len(cand) * pivots / 576)), k)
        piv = by_score(v.x[i].abs().sum(-1), cand, p)
        kept = list(piv)
        rest = [j for j in cand if j not in piv]
        if assign == "max":
            dup = {j: max(cos(v.x[i, j], v.x[i, q]) for q in piv) for j in rest}
            kept += by_score(dup, rest, k - p, largest=False)
        else:
            for n_j, q in enumerate(piv):
                quota = (k - p) // p + (n_j < (k - p) % p)
                dup = {j: cos(v.x[i, j], v.x[i, q]) for j in rest}
                got = by_score(dup, rest, quota, largest=False)
                kept += got
                rest = [j for j in rest if j not in got]
        out[i] = {j: v.x[i, j] for j in kept} | kept_protected(v, i)
    return out


def ref_divprune(v, keep) -> dict:
    out = {}
    for i in range(v.x.shape[0]):
        cand = cands(v, i)
        d = {(a, b): 1 - cos(v.x[i, a], v.x[i, b]) for a in cand for b in cand}
        first = max(
            cand, key=lambda a: (min((d[a, b] for b in cand if b != a), default=math.inf), -a)
        )
        chosen = [first]
        while len(chosen) < int(keep[i]):
            free = [a for a in cand if a not in chosen]
            chosen.append(max(free, key=lambda a: (min(d[a, s] for s in chosen), -a)))
        out[i] = {j: v.x[i, j] for j in chosen} | kept_protected(v, i)
    return out


def ref_recoverable(v, keep, text_share=0.25, merge_share=10 / 64, text_score="mean") -> dict:
    out = {}
    for i in range(v.x.shape[0]):
        cand, k = cands(v, i), int(keep[i])
        k_m = round(k * merge_share)
        k_m = min(max(k_m, 1) if k >= 2 else k_m, k)
        k_t = min(round(k * text_share), max(k - k_m - 1, 0))
        vis = by_score(v.saliency[i], cand, k - k_t - k_m)
        text = v.text[i][v.text_valid[i]]
        if text_score == "mean":
            score = {j: cos(v.x[i, j], text.mean(0)) for j in cand}
        else:
            score = {j: max(cos(v.x[i, j], t) for t in text) for j in cand}
        others = [j for j in cand if j not in vis]
        txt = by_score(score, others, k_t)
        rest = [j for j in others if j not in txt]
        res = {j: v.x[i, j] for j in vis + txt} | kept_protected(v, i)
        for t, members in ref_contextual(v.x[i], rest, k_m, True).items():
            res[t] = v.x[i, [t, *members]].mean(0)
        out[i] = res
    return out


def splitmix_final(z: int) -> int:
    """SplitMix64's finaliser on Python ints (mod 2**64), as written in the paper."""
    m = (1 << 64) - 1
    z = (z * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def ref_random(v, keep, seed=0) -> dict:
    out = {}
    m64 = (1 << 64) - 1
    signed = lambda z: z - (1 << 64) if z >= 1 << 63 else z  # noqa: E731
    for i in range(v.x.shape[0]):
        cand = cands(v, i)
        base = splitmix_final(seed)
        h1 = splitmix_final((base + len(cand)) & m64)
        key = {j: signed(splitmix_final((h1 + r) & m64)) for r, j in enumerate(cand)}
        kept = sorted(cand, key=lambda j: (key[j], j))[: int(keep[i])]
        out[i] = {j: v.x[i, j] for j in kept} | kept_protected(v, i)
    return out


# ----------------------------------------------------------------------------- reference tests
def keeps(v: VisualTokens, ratio: float) -> torch.Tensor:
    return REGISTRY["dart"](ratio=ratio).keep_count(v.candidates.sum(1))


@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.95])
@pytest.mark.parametrize("merge", ["mean", "add"])
def test_visionzip_proj_matches_reference(ratio, merge):
    v = batch(LAYOUTS, seed=1)
    k = keeps(v, ratio)
    check(VisionZipProj(ratio=ratio, merge=merge).select(v, k), v, ref_visionzip(v, k, merge=merge))


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("scales", ["pow2", "any"])
def test_m3_proj_matches_reference(ratio, scales):
    v = batch(LAYOUTS, seed=2)
    k = keeps(v, ratio)
    check(M3Proj(ratio=ratio, scales=scales).select(v, k), v, ref_m3(v, k, scales))


def test_m3_proj_nested_scales_of_a_24x24_grid():
    v = VisualTokens.grid_of(torch.randn(1, 576, 4), 24, 24)
    for ratio, count in [(0.75, 144), (0.9375, 36), (0.984375, 9), (0.999, 1)]:
        m = M3Proj(ratio=ratio)
        red = m.select(v, m.keep_count(v.candidates.sum(1)))
        assert red.n_out == count
        y, _ = red.apply(v.x)
        s = 24 // math.isqrt(count)
        pooled = F.avg_pool2d(v.x[0].T.reshape(1, 4, 24, 24), s).flatten(2)[0].T
        torch.testing.assert_close(y[0], pooled)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.75, 0.9, 0.97])
def test_downsample_proj_matches_adaptive_avg_pool2d(ratio):
    v = batch(LAYOUTS, seed=3)
    k = keeps(v, ratio)
    check(DownsampleProj(ratio=ratio).select(v, k), v, ref_downsample(v, k))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75, 0.9])
def test_aim_merge_matches_reference(ratio):
    v = batch(LAYOUTS, seed=4)
    k = keeps(v, ratio)
    check(AIMMerge(ratio=ratio).select(v, k), v, ref_aim(v, k))


@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.9])
@pytest.mark.parametrize(("pivots", "assign"), [(8, "groups"), (200, "groups"), (100, "max")])
def test_dart_matches_reference(ratio, pivots, assign):
    v = batch(LAYOUTS, seed=5)
    k = keeps(v, ratio)
    got = DART(ratio=ratio, pivots=pivots, assign=assign).select(v, k)
    check(got, v, ref_dart(v, k, pivots, assign))


@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.9])
def test_divprune_matches_reference(ratio):
    v = batch(LAYOUTS, seed=6)
    k = keeps(v, ratio)
    check(DivPrune(ratio=ratio).select(v, k), v, ref_divprune(v, k))


@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.9])
@pytest.mark.parametrize("text_score", ["mean", "max"])
def test_recoverable_matches_reference(ratio, text_score):
    v = batch(LAYOUTS, seed=7)
    k = keeps(v, ratio)
    got = RecoverableCompression(ratio=ratio, text_score=text_score).select(v, k)
    check(got, v, ref_recoverable(v, k, text_score=text_score))


def test_recoverable_falls_back_to_saliency_without_text():
    v = batch(LAYOUTS, seed=8)
    k = keeps(v, 0.75)
    m = RecoverableCompression(ratio=0.75)
    v.text_valid = torch.zeros_like(v.text_valid)
    assert torch.equal(m.text_similarity(v), v.saliency)
    m.select(v, k)  # runs


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_random_proj_matches_reference(seed):
    v = batch(LAYOUTS, seed=9)
    k = keeps(v, 0.6)
    check(RandomProj(ratio=0.6, seed=seed).select(v, k), v, ref_random(v, k, seed))


def test_random_proj_hash_is_splitmix64_and_draws_are_uniform():
    zs = [0, 1, 2**40 + 7, 2**62 + 3]
    got = mix64(torch.tensor(zs)).tolist()
    assert [g % 2**64 for g in got] == [splitmix_final(z) for z in zs]
    # every token is kept about equally often over many seeds
    v = VisualTokens.grid_of(torch.randn(1, 16, 2), 4, 4)
    hits = torch.zeros(16)
    for s in range(400):
        red = RandomProj(ratio=0.75, seed=s).select(v, torch.tensor([4]))
        hits[red.rep[0]] += 1
    assert hits.sum() == 1600
    assert float(hits.min()) > 60 and float(hits.max()) < 140  # 100 expected each
    # a generator, when given, seeds the draw
    v.generator = torch.Generator().manual_seed(3)
    a = RandomProj(ratio=0.75).select(v, torch.tensor([4])).rep
    v.generator = torch.Generator().manual_seed(3)
    assert torch.equal(a, RandomProj(ratio=0.75).select(v, torch.tensor([4])).rep)


# ----------------------------------------------------------------------------- properties
def test_projector_methods_tuple_lists_every_registered_method():
    assert not any(REGISTRY[n].video_only for n in PROJECTOR_METHODS)
    assert len(set(PROJECTOR_METHODS + VIDEO_METHODS)) == len(PROJECTOR_METHODS + VIDEO_METHODS)
    assert sorted(PROJECTOR_METHODS + VIDEO_METHODS) == ALL_PROJECTOR


def make(name: str, ratio: float):
    return REGISTRY[name](ratio=ratio)


@pytest.mark.parametrize("name", PROJECTOR)
@pytest.mark.parametrize("ratio", [0.4, 0.8])
def test_counts_protected_and_padding(name, ratio):
    v = batch(LAYOUTS, seed=10, pad=3)
    m = make(name, ratio)
    k = m.keep_count(v.candidates.sum(1))
    red = m.select(v, k)
    for i in range(v.x.shape[0]):
        reps, feats = outputs(red, v.x, i)
        prot = [j for j in reps if v.protected[i, j]]
        assert prot == v.protected[i].nonzero().flatten().tolist()  # every protected one kept
        for j in prot:  # ... unchanged
            assert torch.equal(feats[reps.index(j)], v.x[i, j])
        assert all(v.valid[i, j] for j in reps)  # no padding among the outputs
        n_cand = len(reps) - len(prot)
        if m.exact_counts:
            assert n_cand == int(k[i])
        else:
            assert 1 <= n_cand <= int(v.candidates[i].sum())
    # padding sends nothing anywhere
    assert float(red.weight[~v.valid[..., None].expand_as(red.weight)].abs().sum()) == 0.0


@pytest.mark.parametrize("name", PROJECTOR)
def test_batch_independence(name):
    v = batch(LAYOUTS, seed=11)
    m = make(name, 0.7)
    red = m.select(v, m.keep_count(v.candidates.sum(1)))
    for i in range(v.x.shape[0]):
        for pad in (0, 5):
            one = row_of(v, i, pad)
            r1 = m.select(one, m.keep_count(one.candidates.sum(1)))
            reps, y = outputs(red, v.x, i)
            reps1, y1 = outputs(r1, one.x, 0)
            assert reps == reps1, (name, i, pad)
            torch.testing.assert_close(y, y1, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", PROJECTOR)
def test_keep_everything_is_the_identity(name):
    v = batch(LAYOUTS, seed=12, pad=2)
    red = make(name, 0.5).select(v, v.candidates.sum(1))
    for i in range(v.x.shape[0]):
        reps, feats = outputs(red, v.x, i)
        assert reps == v.valid[i].nonzero().flatten().tolist()
        assert torch.equal(feats, v.x[i][v.valid[i]])


@pytest.mark.parametrize("name", PROJECTOR)
def test_deterministic(name):
    m = make(name, 0.75)
    a, b = batch(LAYOUTS, seed=13), batch(LAYOUTS, seed=13)
    ra = m.select(a, m.keep_count(a.candidates.sum(1)))
    rb = m.select(b, m.keep_count(b.candidates.sum(1)))
    assert torch.equal(ra.rep, rb.rep)
    assert torch.equal(ra.index, rb.index)
    assert torch.equal(ra.weight, rb.weight)


@pytest.mark.parametrize("name", PROJECTOR)
def test_keep_one_and_tiny_images(name):
    v = batch([[(1, 1, False)], [(1, 2, False)], [(2, 1, False), (1, 3, True)]], seed=14)
    m = make(name, 0.9)
    k = m.keep_count(v.candidates.sum(1))
    assert k.tolist() == [1, 1, 1]
    red = m.select(v, k)
    for i in range(3):
        reps, _ = outputs(red, v.x, i)
        n_cand = sum(1 for j in reps if not v.protected[i, j])
        assert n_cand == 1 or not m.exact_counts


def test_methods_declare_what_they_need():
    assert VisionZipProj.visual_needs == {"saliency"}
    assert RecoverableCompression.visual_needs == {"saliency", "text"}
    assert M3Proj.exact_counts is False and DownsampleProj.exact_counts is False
    for name in PROJECTOR:
        assert REGISTRY[name].__doc__ and "arXiv" in REGISTRY[name].__doc__
    with pytest.raises(ValueError, match="saliency"):
        VisionZipProj(ratio=0.5).select(
            VisualTokens.grid_of(torch.randn(1, 4, 2), 2, 2), torch.tensor([2])
        )
