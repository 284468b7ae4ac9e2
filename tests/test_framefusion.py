"""FrameFusion against slow references written from the paper's definitions (arXiv:2501.01986)."""

from __future__ import annotations

import pytest
import torch
from vlm_models import make, video_inputs_for

import tokenmerge as tm
from tokenmerge.adapters.base import UnsupportedModelError
from tokenmerge.adapters.hf_decoder import runtime_of
from tokenmerge.core.state import Signals, TokenState
from tokenmerge.methods.framefusion import FrameFusion, previous_in_cell


def video_state(seed: int, b: int = 2, n: int = 20, c: int = 6, close: float = 0.5):
    """Hidden states of ``b`` rows: text, then a clip of frames of 4 cells (row 1 shorter and
    left-padded), frames drawn as the previous frame plus noise (``close`` of the cells)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    cell = torch.full((b, n), -1, dtype=torch.long)
    valid = torch.ones(b, n, dtype=torch.bool)
    frames = [4, 3]
    for row in range(b):
        start = 2 + 4 * (4 - frames[row])
        valid[row, : 4 * (4 - frames[row])] = False  # left padding
        for f in range(frames[row]):
            for p in range(4):
                i = start + 4 * f + p
                cell[row, i] = 10 * row + p
                if f and float(torch.rand((), generator=g)) < close:
                    x[row, i] = x[row, i - 4] + 0.3 * torch.randn(c, generator=g)
    x[~valid] = 0.0
    return x, cell, valid


def test_previous_in_cell_matches_a_scan():
    _, cell, valid = video_state(0)
    alive = valid & (torch.rand(valid.shape, generator=torch.Generator().manual_seed(1)) < 0.8)
    got = previous_in_cell(cell, alive)
    for row in range(cell.shape[0]):
        last: dict[int, int] = {}
        for i in range(cell.shape[1]):
            want = -1
            if alive[row, i] and cell[row, i] >= 0:
                want = last.get(int(cell[row, i]), -1)
                last[int(cell[row, i])] = i
            assert int(got[row, i]) == want


def merge_reference(x, cell, valid, r, threshold):
    """{slot: output} of one FrameFusion merge step, with loops."""
    out = []
    for row in range(x.shape[0]):
        prev, last = {}, {}
        for i in range(x.shape[1]):
            if valid[row, i] and cell[row, i] >= 0:
                c = int(cell[row, i])
                if c in last:
                    prev[i] = last[c]
                last[c] = i
        sim = {i: float(torch.nn.functional.cosine_similarity(x[row, i], x[row, j], dim=0))
               for i, j in prev.items()}  # fmt: skip
        above = sorted((i for i in sim if sim[i] >= threshold), key=lambda i: (-sim[i], i))
        merging = set(above[: int(r[row])])

        groups: dict[int, list[int]] = {}
        for i in range(x.shape[1]):
            if valid[row, i]:
                start = i
                while start in merging:  # follow the run back to its first token
                    start = prev[start]
                groups.setdefault(start, []).append(i)
        out.append({k: x[row, v].mean(0) for k, v in groups.items()})
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("r", [0, 1, 3, 100])
@pytest.mark.parametrize("threshold", [0.6, 0.9, -1.0])
def test_merge_step_matches_reference(seed, r, threshold):
    x, cell, valid = video_state(seed, close=0.6)
    r_t = torch.full((2,), r)
    state = TokenState.start(x, valid & (cell < 0), size=valid.to(x.dtype))
    sig = Signals(x=x, k=None, cell=cell)
    red = FrameFusion(ratio=0.5, layer=2, similarity=threshold).reduce(sig, state, r_t, 0)
    want = merge_reference(x, cell, valid, r_t, threshold)
    if red is None:
        assert r == 0
        return
    y, size = red.apply(x, state.size)
    for row in range(2):
        got = {int(red.rep[row, j]): y[row, j] for j in range(y.shape[1]) if size[row, j] > 0}
        assert sorted(got) == sorted(want[row])
        for k in want[row]:
            torch.testing.assert_close(got[k], want[row][k])
    if threshold == -1.0:  # every video token but each cell's first is eligible: r of them go
        removed = valid.sum(1) - (size > 0).sum(1)
        assert removed.tolist() == [min(r, 12), min(r, 8)]


def test_pruning_ranks_by_attention_over_heads_and_real_queries():
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 9, 4
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :3] = False
    causal = torch.ones(n, n).tril().bool()
    allowed = causal[None] & valid[:, None, :]
    bias = torch.zeros(b, 1, n, n).masked_fill(~allowed[:, None], -torch.inf)
    sig = Signals(x=torch.randn(b, n, 5, generator=g), k=k, q=q, scale=0.5, bias=bias)
    state = TokenState.start(sig.x, ~valid | (torch.arange(n) < 1), size=valid.float())
    got = FrameFusion(ratio=0.5, layer=1).importance(sig, state)
    for row in range(b):
        for j in range(n):
            total, count = 0.0, 0
            for i in range(n):
                if not valid[row, i]:
                    continue
                count += 1
                for head in range(h):
                    logits = [float(q[row, head, i] @ k[row, head, t]) * 0.5 for t in range(n)]
                    ok = [bool(allowed[row, i, t]) for t in range(n)]
                    z = sum(torch.tensor(v).exp() for v, o in zip(logits, ok, strict=True) if o)
                    p = float(torch.tensor(logits[j]).exp() / z) if ok[j] else 0.0
                    total += p / h
            assert abs(float(got[row, j]) - total / count) < 1e-5


def test_still_clip_merges_in_the_shallow_layers():
    """Frames that repeat: the merge at layer 0 removes the whole budget, and pruning at
    layer K has nothing left to do; the kept count is exact."""
    model, _ = make("llava")
    inputs = video_inputs_for("llava", [1])  # 3 frames of 16 tokens
    px = inputs["pixel_values"]
    inputs["pixel_values"] = px[:1].expand_as(px).clone()
    with tm.patched(model, FrameFusion(ratio=0.5, layer=2)), torch.no_grad():
        model(**inputs)
        run = runtime_of(model).last
    per_layer = [int(t) for t in torch.stack(run.tokens_per_layer)[:, 0]]
    text = int(inputs["attention_mask"].sum()) - 48
    assert per_layer == [text + 24] * 3


def test_framefusion_refused_on_a_text_llm():
    from test_llm import tiny

    model = tiny("llama")
    with pytest.raises(UnsupportedModelError, match="adjacent video frames"):
        tm.apply(model, FrameFusion(ratio=0.5))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="similarity"):
        FrameFusion(ratio=0.5, similarity=1.5)
    with pytest.raises(ValueError, match="layer"):
        FrameFusion(ratio=0.5, layer=5).schedule(3)
