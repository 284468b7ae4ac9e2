"""HoliTom against slow references written from the paper's definitions (arXiv:2505.21334)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tokenmerge.methods.projector.base import VisualTokens
from tokenmerge.methods.projector.holitom import HoliTom, allot, dpc_knn, segments


# ----------------------------------------------------------------------------- segmentation
def removed(sim: torch.Tensor, s: int, e: int, tau: float) -> int:
    """Tokens a window [s, e] removes: (e - s) per position similar above tau throughout."""
    if e == s:
        return 0
    static = [all(float(sim[t, p]) > tau for t in range(s, e)) for p in range(sim.shape[1])]
    return (e - s) * sum(static)


def all_segmentations(f: int, w: int):
    """Every split of frames 0..f-1 into consecutive windows of at most w frames."""
    for cuts in itertools.product([False, True], repeat=f - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [f]
        segs = [(a, b - 1) for a, b in itertools.pairwise(bounds)]
        if all(e - s + 1 <= w for s, e in segs):
            yield segs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [2, 3, 1024])
def test_segments_maximise_the_tokens_removed(seed, window):
    g = torch.Generator().manual_seed(seed)
    f, p = 7, 5
    sim = torch.rand(f - 1, p, generator=g, dtype=torch.float64) * 0.4 + 0.6
    got = segments(sim, 0.8, window)
    assert got[0][0] == 0 and got[-1][1] == f - 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(got))
    assert all(e - s + 1 <= window for s, e in got)
    best = max(
        sum(removed(sim, s, e, 0.8) for s, e in segs) for segs in all_segmentations(f, window)
    )
    assert sum(removed(sim, s, e, 0.8) for s, e in got) == best


def test_segments_split_at_a_scene_cut():
    sim = torch.ones(5, 3)  # 6 frames, a cut between frames 2 and 3
    sim[2] = 0.0
    assert segments(sim, 0.8, 1024) == [(0, 2), (3, 5)]


# ----------------------------------------------------------------------------- DPC-kNN
def dpc_reference(x: torch.Tensor, c: int, k: int) -> tuple[list[int], list[int]]:
    m, dim = x.shape
    d = [[float(torch.linalg.vector_norm(x[i] - x[j])) / math.sqrt(dim) for j in range(m)]
         for i in range(m)]  # fmt: skip
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:k]) / k) for i in range(m)]
    dmax = max(max(row) for row in d)
    delta = []
    for i in range(m):
        denser = [d[i][j] for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(denser) if denser else dmax)
    score = [rho[i] * delta[i] for i in range(m)]
    centres = sorted(sorted(range(m), key=lambda i: (-score[i], i))[:c])
    assign = [
        centres.index(i) if i in centres else min(range(c), key=lambda a: (d[i][centres[a]], a))
        for i in range(m)
    ]
    return centres, assign


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c,k", [(1, 1), (3, 3), (5, 7), (12, 7)])
def test_dpc_knn_matches_reference(seed, c, k):
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    centres, assign = dpc_knn(x, c, k)
    want_c, want_a = dpc_reference(x, c, k)
    assert centres.tolist() == want_c and assign.tolist() == want_a


def test_allot_is_exact_and_proportional():
    for sizes, total in [([5, 5, 6], 7), ([1, 1, 1, 10], 3), ([4], 2), ([3, 0, 3], 5)]:
        got = allot(sizes, total)
        assert sum(got) == total and all(0 <= q <= s for q, s in zip(got, sizes, strict=True))
        n = sum(sizes)
        assert all(abs(q - s * total / n) < 1 for q, s in zip(got, sizes, strict=True))


# ----------------------------------------------------------------------------- the method
def clip_tokens(frames: list[int], rows: int, cols: int, seed: int, static: float = 0.0):
    """VisualTokens of clips (one per row, frames as parts, right-padded), with saliency. A
    share ``static`` of the positions keep nearly the same value through the clip."""
    g = torch.Generator().manual_seed(seed)
    p = rows * cols
    n = max(frames) * p
    u, c = len(frames), 8
    x = torch.zeros(u, n, c, dtype=torch.float64)
    valid = torch.zeros(u, n, dtype=torch.bool)
    coord = torch.full((u, n, 2), -1, dtype=torch.long)
    part = torch.full((u, n), -1, dtype=torch.long)
    grid = torch.zeros(u, max(frames), 2, dtype=torch.long)
    for row, f in enumerate(frames):
        base = torch.randn(p, c, generator=g, dtype=torch.float64)
        still = torch.rand(p, generator=g) < static
        for t in range(f):
            noise = torch.randn(p, c, generator=g, dtype=torch.float64)
            frame = torch.where(still[:, None], base + 0.05 * noise, noise)
            sl = slice(t * p, (t + 1) * p)
            x[row, sl] = frame
            valid[row, sl] = True
            ar = torch.arange(p)
            coord[row, sl] = torch.stack([ar // cols, ar % cols], -1)
            part[row, sl] = t
            grid[row, t] = torch.tensor([rows, cols])
    return VisualTokens(
        x=x,
        valid=valid,
        protected=torch.zeros_like(valid),
        coord=coord,
        part=part,
        grid=grid,
        frames=torch.tensor(frames),
        saliency=torch.rand(u, n, generator=g, dtype=torch.float64),
    )


def holitom_reference(v: VisualTokens, row: int, keep: int, m: HoliTom) -> dict[int, torch.Tensor]:
    """{kept position: feature} of one clip, from the definitions with plain loops."""
    f = int(v.frames[row])
    cols = int(v.grid[row, 0, 1])
    p = int(v.grid[row, 0, 0]) * cols
    at = {}
    for i in range(v.x.shape[1]):
        if v.valid[row, i]:
            at[(int(v.part[row, i]), int(v.coord[row, i, 0]) * cols + int(v.coord[row, i, 1]))] = i
    x = v.x[row]

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    sim = torch.tensor([[cos(x[at[t, q]], x[at[t + 1, q]]) for q in range(p)]
                        for t in range(f - 1)])  # fmt: skip
    groups = []  # (list of positions, list of [token per frame], static?)
    for s, e in segments(sim, m.tau, m.max_window):
        static = [e > s and all(float(sim[t, q]) > m.tau for t in range(s, e)) for q in range(p)]
        if any(static):
            groups.append(([at[s, q] for q in range(p) if static[q]],
                           [[at[t, q] for t in range(s, e + 1)] for q in range(p) if static[q]],
                           True))  # fmt: skip
        for t in range(s, e + 1):
            qs = [q for q in range(p) if not static[q]]
            groups.append(([at[t, q] for q in qs], [[at[t, q]] for q in qs], False))
    sizes = [len(gr[0]) for gr in groups]
    quota = allot(sizes, keep) if keep < sum(sizes) else sizes
    out = {}
    for (reps, members, is_static), q in zip(groups, quota, strict=True):
        if q == 0:
            continue
        feats = [torch.stack([x[j] for j in mem]).mean(0) for mem in members]
        n_dom = 0 if is_static else round(q * m.dominant)
        sal = [float(v.saliency[row, r]) for r in reps]
        dom = sorted(range(len(reps)), key=lambda i: (-sal[i], i))[:n_dom]
        for i in dom:
            out[reps[i]] = feats[i]
        rest = [i for i in range(len(reps)) if i not in dom]
        c = min(q - n_dom, len(rest))
        if c == 0:
            continue
        centres, assign = dpc_reference(torch.stack([feats[i] for i in rest]), c, min(m.knn, c))
        for a, ci in enumerate(centres):
            mem = [feats[rest[i]] for i in range(len(rest)) if assign[i] == a and i != ci]
            own = feats[rest[ci]]
            out[reps[rest[ci]]] = (
                m.beta * own + (1 - m.beta) * torch.stack(mem).mean(0) if mem else own
            )
    return out


@pytest.mark.parametrize("static", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("dominant", [1.0, 0.5])
def test_holitom_matches_reference(static, ratio, dominant):
    v = clip_tokens([4, 3, 2], rows=3, cols=3, seed=int(ratio * 100) + int(static * 10))
    m = HoliTom(ratio=ratio, dominant=dominant)
    keep = m.keep_count(v.candidates.sum(1))
    red = m.select(v, keep)
    y, size = red.apply(v.x, v.valid.to(v.x.dtype))
    for row in range(3):
        want = holitom_reference(v, row, int(keep[row]), m)
        got = {int(red.rep[row, j]): y[row, j] for j in range(y.shape[1]) if size[row, j] > 0}
        assert sorted(got) == sorted(want)
        for pos in want:
            torch.testing.assert_close(got[pos], want[pos])
        assert len(got) <= int(keep[row])


def test_a_still_clip_collapses_to_one_frame():
    """Every position static through the clip: HoliTom's temporal merge leaves one token per
    position, its mean over the frames, at the first frame's position."""
    v = clip_tokens([5], rows=2, cols=3, seed=0, static=1.0)
    m = HoliTom(ratio=0.5)
    red = m.select(v, m.keep_count(v.candidates.sum(1)))
    y, size = red.apply(v.x, v.valid.to(v.x.dtype))
    assert int((size > 0).sum()) == 6 and red.rep[0, :6].tolist() == list(range(6))
    torch.testing.assert_close(y[0, :6], v.x[0].view(5, 6, -1).mean(0))


def test_inner_stage_uses_the_paper_split():
    assert HoliTom(ratio=0.5).inner(28).layer == 18
    inner = HoliTom(ratio=0.5).inner(30)
    assert inner.layer == 19 and inner.ratio == 0.5
    assert HoliTom(ratio=0.5, inner_ratio=0.0).inner(30) is None
    assert HoliTom.example(0).is_identity and not HoliTom(ratio=0.0).is_identity


@pytest.mark.parametrize("bad", [{"tau": 2.0}, {"max_window": 0}, {"beta": -0.1}, {"knn": 0},
                                 {"inner_ratio": 1.0}, {"dominant": 1.5}])  # fmt: skip
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="HoliTom"):
        HoliTom(ratio=0.5, **bad)


# ----------------------------------------------------------------------------- in the VLM
@pytest.mark.parametrize(("ratio", "inner"), [(0.5, 0.5), (0.5, 0.0), (0.0, 0.5), (0.75, 0.25)])
def test_both_stages_run_in_a_vlm(ratio, inner):
    """The projector stage leaves at most ``keep`` video tokens; the in-LLM stage at K = 2 of
    3 layers then removes ``inner_ratio`` of what entered the LLM (the tiny LLaVA's clips)."""
    from vlm_models import make, video_inputs_for

    import tokenmerge as tm
    from tokenmerge.adapters.hf_decoder import runtime_of

    model, _ = make("llava")
    inputs = video_inputs_for("llava", [0, 1])
    text = inputs["attention_mask"].sum(1) - (inputs["input_ids"] == 99).sum(1)
    video = (inputs["input_ids"] == 99).sum(1)
    method = HoliTom(ratio=ratio, inner_ratio=inner)
    assert method.inner(3) is None or method.inner(3).layer == 2
    with tm.patched(model, method), torch.no_grad():
        model(**inputs)
        per_layer = torch.stack(runtime_of(model).last.tokens_per_layer, 1) - text[:, None]
    first, last = per_layer[:, 0], per_layer[:, 2]
    assert torch.equal(per_layer[:, 1], first)
    if ratio == 0.0:
        assert torch.equal(first, video)
    else:
        assert (first <= torch.round(video * (1 - ratio))).all()
    assert torch.equal(last, torch.round(first * (1 - inner)).long())
