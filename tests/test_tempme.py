"""TempMe at the projector site (tokenmerge.methods.projector.tempme): against a slow reference
written here from the definition (Python loops over one clip's tokens, stage by stage, lists of
frame groups, brute-force best edge per A token), plus counts, identity, protected tokens, the
stage-0 groups, images (= AIM's merging) and merging across identical frames."""

from __future__ import annotations

import pytest
import torch

import tokenmerge.methods.projector.tempme as tempme_mod
from tokenmerge.methods.projector import AIMMerge, TempMe, VisualTokens

DIM = 8


# ----------------------------------------------------------------------------- clips
def clip(frames: int, rows: int, cols: int, prot_after: tuple[int, ...] = ()) -> tuple:
    """A clip: ``frames`` parts of one ``rows x cols`` grid; a protected token after each
    part listed in ``prot_after`` (OneVision's newline: after the last frame)."""
    return frames, [(rows, cols)] * frames, prot_after


def image(parts: list[tuple[int, int]], prot_after: tuple[int, ...] = ()) -> tuple:
    """An image (one frame) with one or several parts (LLaVA-NeXT's base grid and tiles)."""
    return 1, parts, prot_after


def build(rows: list[tuple], seed: int = 0, pad: int = 0, x: torch.Tensor | None = None):
    """Visual tokens of ``rows`` (right-padded, ``pad`` extra slots): features ``x`` or, by
    default, float64 ones in which each frame is the previous one plus noise (so that temporal
    merges have something to find)."""
    g = torch.Generator().manual_seed(seed)
    layouts = []
    for frames, parts, prot_after in rows:
        toks = []  # (part, row, col) or None for a protected token
        for p, (r, c) in enumerate(parts):
            toks += [(p, i, j) for i in range(r) for j in range(c)]
            toks += [None] * (p in prot_after)
        layouts.append((frames, parts, toks))
    u = len(rows)
    n = max(len(t) for *_, t in layouts) + pad
    n_parts = max(len(p) for _, p, _ in layouts)
    temporal = x is None
    if x is None:
        x = torch.randn(u, n, DIM, generator=g, dtype=torch.float64)
    valid = torch.zeros(u, n, dtype=torch.bool)
    prot = torch.zeros(u, n, dtype=torch.bool)
    coord = torch.full((u, n, 2), -1, dtype=torch.long)
    part = torch.full((u, n), -1, dtype=torch.long)
    grid = torch.zeros(u, n_parts, 2, dtype=torch.long)
    for i, (_, parts, toks) in enumerate(layouts):
        prev: dict = {}
        for j, t in enumerate(toks):
            valid[i, j] = True
            if t is None:
                prot[i, j] = True
                continue
            part[i, j], coord[i, j] = t[0], torch.tensor(t[1:])
            if temporal and t[0] > 0 and t[1:] in prev:  # frame f = frame f-1 + noise
                x[i, j] = x[i, prev[t[1:]]] + 0.4 * x[i, j]
            prev[t[1:]] = j
        for p, rc in enumerate(parts):
            grid[i, p] = torch.tensor(rc)
    return VisualTokens(
        x=x.masked_fill(~valid[..., None], 0.0),
        valid=valid,
        protected=prot,
        coord=coord,
        part=part,
        grid=grid,
        frames=torch.tensor([f for f, _, _ in rows]),
    )


ROWS = [
    clip(2, 4, 4),
    clip(3, 3, 3, prot_after=(2,)),  # OneVision: a newline after the last frame
    clip(5, 3, 3, prot_after=(1,)),  # a protected token between frames
    clip(8, 3, 3),
    clip(5, 1, 1),  # one-token frames: stage 0 has no edge at all
    image([(2, 2), (3, 3)], prot_after=(1,)),  # an image: one group over both parts
]


# ----------------------------------------------------------------------------- reference
def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / max(float(a.norm() * b.norm()), 1e-12))


def frame_groups(frames: int, merge_frames: tuple[int, ...]) -> list[list[list[int]]]:
    """Per stage, the groups of frames: single frames, then adjacent groups joined
    ``merge_frames[s-1]`` (or 2) at a time until one remains; the last stage joins everything."""
    stages = [[[f] for f in range(frames)]]
    while len(stages[-1]) > 1:
        s = len(stages)
        if merge_frames and s > len(merge_frames):
            break
        k = merge_frames[s - 1] if merge_frames else 2
        prev = stages[-1]
        stages.append([[f for g in prev[i : i + k] for f in g] for i in range(0, len(prev), k)])
    stages[-1] = [list(range(frames))]
    return stages


def reference(v: VisualTokens, keep: torch.Tensor, merge_frames=()) -> list[dict]:
    """Per row ``{representative: sorted members}``, protected tokens their own."""
    out = []
    for i in range(v.x.shape[0]):
        n = v.x.shape[1]
        cand = [j for j in range(n) if v.valid[i, j] and not v.protected[i, j]]
        frames = int(v.frames[i])
        frame = {j: int(v.part[i, j]) if frames > 1 else 0 for j in cand}
        stages = frame_groups(frames, merge_frames)
        m, k, s_tot = len(cand), int(keep[i]), len(stages)
        counts = [round(m * (k / m) ** ((s + 1) / s_tot)) for s in range(s_tot - 1)] + [k]
        groups = {j: [j] for j in cand}

        def mean(t, i=i, groups=groups):
            return v.x[i, groups[t]].mean(0)

        for stage, target in zip(stages, counts, strict=True):
            gid = {f: g for g, fs in enumerate(stage) for f in fs}
            while len(groups) > target:
                alive = sorted(groups)
                r = min(len(alive) - target, len(alive) // 2)
                edges = []
                for a in alive[0::2]:
                    same = [b for b in alive[1::2] if gid[frame[b]] == gid[frame[a]]]
                    if same:
                        best = max(same, key=lambda b, a=a: (cos(mean(a), mean(b)), -b))
                        edges.append((-cos(mean(a), mean(best)), a, best))
                if not edges:
                    break  # no edge within the groups: the next stage's groups are larger
                for _, a, b in sorted(edges)[:r]:
                    groups[b] = groups[b] + groups.pop(a)
        prot = {j: [j] for j in range(n) if v.protected[i, j]}
        out.append({t: sorted(ms) for t, ms in groups.items()} | prot)
    return out


def members(red, i: int) -> dict:
    """Row ``i`` of a reduction as ``{representative: sorted members}``."""
    res: dict = {}
    for j in range(red.n_in):
        if float(red.weight[i, j, 0]) > 0:
            res.setdefault(int(red.rep[i, red.index[i, j, 0]]), []).append(j)
    return res


def assert_matches(red, v: VisualTokens, ref: list[dict]) -> None:
    y, size = red.apply(v.x)
    for i, want in enumerate(ref):
        assert members(red, i) == want, i
        real = size[i] > 0
        assert red.rep[i][real].tolist() == sorted(want)  # kept positions
        exp = torch.stack([v.x[i, want[t]].mean(0) for t in sorted(want)])
        torch.testing.assert_close(y[i][real], exp)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("merge_frames", [(), (2, 2, 3), (3,), (2,)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(ratio, merge_frames, seed):
    v = build(ROWS, seed=seed, pad=2)
    m = TempMe(ratio=ratio, merge_frames=merge_frames)
    keep = m.keep_count(v.candidates.sum(1))
    red = m.select(v, keep)
    assert_matches(red, v, reference(v, keep, merge_frames))


def test_frame_groups_of_the_reference():
    """The reference's schedule itself: pairs with a trailing incomplete group; TempMe's
    2-2-3 on 12 frames; a list that stops short ends with one group of everything."""
    assert frame_groups(5, ()) == [
        [[0], [1], [2], [3], [4]],
        [[0, 1], [2, 3], [4]],
        [[0, 1, 2, 3], [4]],
        [[0, 1, 2, 3, 4]],
    ]
    assert [len(s) for s in frame_groups(12, (2, 2, 3))] == [12, 6, 3, 1]
    assert [len(s) for s in frame_groups(16, (2, 2, 3))] == [16, 8, 4, 1]
    assert frame_groups(1, ()) == [[[0]]]


@pytest.mark.parametrize("ratio", [0.2, 0.6, 0.95])
def test_exact_counts_protected_and_padding(ratio):
    rows = [
        clip(f, r, c, prot_after=(f - 1,)) for f in (2, 3, 7) for r, c in ((1, 1), (1, 2), (3, 4))
    ]
    v = build([*rows, image([(1, 1)]), image([(2, 3), (1, 2)])], seed=3, pad=3)
    m = TempMe(ratio=ratio)
    keep = m.keep_count(v.candidates.sum(1))
    red = m.select(v, keep)
    y, size = red.apply(v.x)
    for i in range(v.x.shape[0]):
        reps = red.rep[i][size[i] > 0]
        assert int((~v.protected[i, reps]).sum()) == int(keep[i])
        for j in v.protected[i].nonzero().flatten().tolist():  # kept, unchanged, alone
            slot = int(red.index[i, j, 0])
            assert int(red.rep[i, slot]) == j and float(size[i, slot]) == 1.0
            assert torch.equal(y[i, slot], v.x[i, j])
    assert float(red.weight[~v.valid].abs().sum()) == 0.0  # padding sends nothing


def test_ratio_zero_and_keep_everything_are_the_identity():
    v = build(ROWS, seed=4, pad=2)
    for m, keep in ((TempMe(ratio=0.0), None), (TempMe(ratio=0.5), v.candidates.sum(1))):
        keep = m.keep_count(v.candidates.sum(1)) if keep is None else keep
        red = m.select(v, keep)
        y, size = red.apply(v.x)
        for i in range(v.x.shape[0]):
            real = size[i] > 0
            assert red.rep[i][real].tolist() == v.valid[i].nonzero().flatten().tolist()
            assert torch.equal(y[i][real], v.x[i][v.valid[i]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_image_is_aim_merging(dtype):
    """One frame: a single stage whose one group spans every part, i.e. AIM's merging."""
    v = build([image([(5, 5)]), image([(2, 2), (3, 5)], prot_after=(1,))], seed=5, pad=1)
    v.x, v.frames = v.x.to(dtype), None
    for ratio in (0.3, 0.75, 0.9):
        keep = TempMe(ratio=ratio).keep_count(v.candidates.sum(1))
        a, b = TempMe(ratio=ratio).select(v, keep), AIMMerge(ratio=ratio).select(v, keep)
        assert torch.equal(a.rep, b.rep) and torch.equal(a.index, b.index)
        assert torch.equal(a.weight, b.weight)


def test_merges_stay_within_the_stage_groups(monkeypatch):
    """Every bipartite step joins tokens of one group only; the first stage's groups are
    single frames and the last one's the whole clip."""
    calls = []
    step = tempme_mod.bipartite_step

    def spy(feat, alive, r, group):
        t = step(feat, alive, r, group)
        calls.append((group.clone(), t))
        return t

    monkeypatch.setattr(tempme_mod, "bipartite_step", spy)
    v = build([clip(8, 3, 3), clip(4, 4, 4)], seed=6)
    TempMe(ratio=0.9).select(v, TempMe(ratio=0.9).keep_count(v.candidates.sum(1)))
    cand = v.candidates
    for group, t in calls:
        moved = cand & (t != torch.arange(t.shape[1]))
        assert torch.equal(group.gather(1, t)[moved], group[moved])
    assert torch.equal(calls[0][0][cand], v.part[cand])
    assert int(calls[-1][0][cand].abs().sum()) == 0
    assert any(bool((g[cand] != v.part[cand]).any()) for g, _ in calls)  # clip stages ran


@pytest.mark.parametrize("frames", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_frames_merge_across_frames(frames, seed):
    """Frames that are copies of one 2x3 frame ``a a b / b c c``: stage 0 merges each
    frame's equal pairs, the clip stages then merge the frames' copies, so at keep = 3 each
    kept token holds every copy of one value, from every frame, and equals that value."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(3, DIM, generator=g, dtype=torch.float64)
    x = values.repeat_interleave(2, 0).repeat(frames, 1)[None]
    v = build([clip(frames, 2, 3)], x=x.clone())
    red = TempMe(ratio=1 - 1 / (2 * frames)).select(v, torch.tensor([3]))
    y, size = red.apply(v.x)
    assert size[0].tolist() == [2.0 * frames] * 3
    for slot, (_, ms) in enumerate(sorted(members(red, 0).items())):
        assert sorted({int(v.part[0, j]) for j in ms}) == list(range(frames))
        (which,) = {j % 6 // 2 for j in ms}  # copies of one value only
        torch.testing.assert_close(y[0, slot], values[which])


@pytest.mark.parametrize("frames", [2, 3, 5])
def test_one_token_frames_fall_through_to_the_clip_stages(frames):
    """Stage 0 has no edge (one token per frame); the next stages' groups still reach the
    budget: identical one-token frames end as one token holding all of them."""
    value = torch.randn(DIM, dtype=torch.float64)
    v = build([clip(frames, 1, 1)], x=value.expand(1, frames, DIM).clone())
    red = TempMe(ratio=0.9).select(v, torch.tensor([1]))
    y, size = red.apply(v.x)
    assert size[0].tolist() == [float(frames)]
    torch.testing.assert_close(y[0, 0], value)


def test_merge_frames_must_join_groups():
    with pytest.raises(ValueError, match="merge_frames"):
        TempMe(ratio=0.5, merge_frames=(2, 1))
    assert TempMe(ratio=0.5, merge_frames=[2, 2, 3]).merge_frames == (2, 2, 3)
