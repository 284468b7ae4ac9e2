"""Video input on the hf-vlm adapter: LLaVA (a clip is its frames given as images, back to
back), LLaVA-OneVision (``pixel_values_videos``, 2x2-pooled frames and one newline token) and
Qwen2-VL / Qwen2.5-VL (temporal patches with 3-D M-RoPE, Qwen2.5-VL's temporal positions
spaced by ``tokens_per_second``).

Checked per model: the projector method sees one row per clip with one part per frame, budget
0 is bit-identical (forward and ``generate``), counts are as scheduled, and a sample alone
gives what it gives in a batch of clips of different lengths, at every decoding step.
"""

from __future__ import annotations

import pytest
import torch
from vlm_models import VIDEO, VIDEO_NAMES, clip_frames, make, method_for, outputs, video_inputs_for

import tokenmerge as tm
from tokenmerge.adapters.hf_decoder import runtime_of
from tokenmerge.methods.projector.random_proj import RandomProj

#: per frame: (rows, cols) of its token grid, in each model's layout
FRAME_GRID = {"llava": (4, 4), "llava-onevision": (2, 2), "qwen2-vl": (2, 2), "qwen2.5-vl": (2, 2)}
METHODS = [
    "random_proj",
    "downsample_proj",
    "frame_subsample",
    "dart",
    "aim_merge",
    "fastv",
    "holitom",
    "tempme",
    "framefusion",
]
#: methods that rank tokens by the vision tower's saliency, which OneVision video lacks
SALIENCY = {"holitom"}
SAMPLES = [0, 1, 2]


def frames_of(name: str) -> torch.Tensor:
    return torch.tensor([clip_frames(name, i) for i in SAMPLES])


def _visual(name: str, ids: torch.Tensor) -> torch.Tensor:
    from vlm_models import IMAGE

    return ids == (IMAGE if name == "llava" else VIDEO)


@pytest.fixture(scope="module", params=VIDEO_NAMES)
def clip(request):
    name = request.param
    model, _ = make(name)
    inputs = video_inputs_for(name, SAMPLES)
    return name, model, inputs, *outputs(model, inputs)


def test_a_clip_is_one_row_with_a_part_per_frame(clip, monkeypatch):
    name, model, inputs, _, _ = clip
    (v,) = _seen_by(RandomProj(ratio=0.5), model, inputs, monkeypatch)
    frames = [clip_frames(name, i) for i in SAMPLES]
    rows, cols = FRAME_GRID[name]
    assert v.frames.tolist() == frames
    for u, f in enumerate(frames):
        cand = v.candidates[u]
        assert int(cand.sum()) == f * rows * cols
        # every frame is one part holding its whole grid once, in raster order
        for t in range(f):
            at = cand & (v.part[u] == t)
            got = v.coord[u][at].tolist()
            assert got == [[r, c] for r in range(rows) for c in range(cols)]
            assert v.grid[u, t].tolist() == [rows, cols]
        assert int(v.protected[u].sum()) == (1 if name == "llava-onevision" else 0)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_zero_budget(clip, method):
    name, model, inputs, ref, gen = clip
    if _refused(name, method):
        return
    out, again = outputs(model, inputs, method_for(method, 0.0))
    assert torch.equal(out, ref) and torch.equal(again, gen)


@pytest.mark.parametrize("method", METHODS)
def test_reduces_clips_batch_independent(clip, method):
    name, model, inputs, _, _ = clip
    if _refused(name, method):
        return
    ids = inputs["input_ids"]
    visual = (_visual(name, ids) & inputs["attention_mask"].bool()).sum(1)
    text = inputs["attention_mask"].sum(1) - visual
    with tm.patched(model, method_for(method, 0.5)):
        with torch.no_grad():
            out = model(**inputs).logits
        kept = runtime_of(model).last.valid.sum(1) - text
        newline = int(name == "llava-onevision")
        reducible = visual - newline
        if method == "downsample_proj":  # each frame's grid pooled on its own: sqrt(1/2) a side
            rows, cols = FRAME_GRID[name]
            per = round(rows * 0.5**0.5) * round(cols * 0.5**0.5)
            assert kept.tolist() == (frames_of(name) * per + newline).tolist()
        elif method == "frame_subsample":  # whole frames: K of F, K = round(F keep / m)
            per = reducible // frames_of(name)
            want = [
                max(1, min(f, round(f * round(r * 0.5) / r))) * p + newline
                for f, r, p in zip(
                    frames_of(name).tolist(), reducible.tolist(), per.tolist(), strict=True
                )
            ]
            assert kept.tolist() == want
        elif method == "holitom":  # at most half before the LLM, then half of that inside it
            before = torch.round(reducible * 0.5) + newline
            assert (kept <= torch.ceil(before * 0.5)).all() and (kept >= 1).all()
        elif method == "framefusion":  # a decoder method: half of every video placeholder
            assert kept.tolist() == torch.round(visual * 0.5).long().tolist()
        elif method != "fastv":  # the last layer holds half of every clip
            assert kept.tolist() == (torch.round(reducible * 0.5).long() + newline).tolist()
        else:
            assert (kept < visual).all()
        kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        gen = model.generate(**inputs, **kw, output_logits=True)
        for b in SAMPLES:
            alone_inputs = video_inputs_for(name, [b])
            with torch.no_grad():
                alone = model(**alone_inputs).logits
            torch.testing.assert_close(alone[0, -1], out[b, -1], atol=1e-5, rtol=1e-5)
            steps = model.generate(**alone_inputs, **kw, output_logits=True)
            for t in range(3):
                torch.testing.assert_close(
                    steps.logits[t][0], gen.logits[t][b], atol=1e-5, rtol=1e-5
                )


def _refused(name: str, method: str) -> bool:
    """Whether ``method`` is refused on ``name``'s clips (OneVision video has no saliency
    maps): then the refusal, by name, is what the test checks."""
    if name == "llava-onevision" and method in SALIENCY:
        with pytest.raises(ValueError, match="saliency of LLaVA-OneVision video"):
            outputs(make(name)[0], video_inputs_for(name, SAMPLES), method_for(method, 0.5))
        return True
    return False


def _seen_by(method, model, inputs, monkeypatch) -> list:
    """The VisualTokens that `method` was given in one forward of `model`."""
    seen = []
    original = type(method).select

    def spy(self, v, keep):
        seen.append(v)
        return original(self, v, keep)

    monkeypatch.setattr(type(method), "select", spy)
    with tm.patched(model, method), torch.no_grad():
        model(**inputs)
    monkeypatch.undo()
    return seen


def test_saliency_of_a_clip_is_its_frames_maps(monkeypatch):
    """LLaVA: each frame of a clip gets the map the same frame gets given alone as an image."""
    from vlm_models import IMAGE

    model, _ = make("llava")
    inputs = video_inputs_for("llava", SAMPLES)
    method = tm.get_method("visionzip_proj", ratio=0.5)
    (v,) = _seen_by(method, model, inputs, monkeypatch)
    frames = inputs["pixel_values"]
    k = 0
    for u, f in enumerate(v.frames.tolist()):
        for t in range(f):
            alone = {
                "input_ids": torch.tensor([[1, *[IMAGE] * 16, 7]]),
                "attention_mask": torch.ones(1, 18, dtype=torch.long),
                "pixel_values": frames[k : k + 1],
            }
            (w,) = _seen_by(method, model, alone, monkeypatch)
            at = v.part[u] == t
            torch.testing.assert_close(v.saliency[u][at], w.saliency[0][w.valid[0]])
            k += 1
    assert k == frames.shape[0]


def test_qwen_clip_saliency_covers_every_frame(monkeypatch):
    model, _ = make("qwen2-vl")
    inputs = video_inputs_for("qwen2-vl", SAMPLES)
    (v,) = _seen_by(tm.get_method("visionzip_proj", ratio=0.5), model, inputs, monkeypatch)
    for u, f in enumerate(v.frames.tolist()):
        for t in range(f):  # the tower attends within each frame: a distribution over it
            at = v.candidates[u] & (v.part[u] == t)
            merged = v.saliency[u][at]  # means over the m x m = 4 patches of each token
            assert (merged > 0).all()
            torch.testing.assert_close(merged.sum(), torch.tensor(0.25))


def test_onevision_video_saliency_refused():
    model, _ = make("llava-onevision")
    inputs = video_inputs_for("llava-onevision", SAMPLES)
    method = tm.get_method("visionzip_proj", ratio=0.5)
    refused = pytest.raises(ValueError, match=r"video frames is not supported.*random_proj")
    with tm.patched(model, method), torch.no_grad(), refused:
        model(**inputs)


def test_tower_methods_refused_on_clips():
    model, _ = make("llava")
    inputs = video_inputs_for("llava", SAMPLES)
    refused = pytest.raises(ValueError, match="video clip's frames are not supported")
    with tm.patched(model, tm.ToMe(r=2)), torch.no_grad(), refused:
        model(**inputs)


def test_frame_subsample_refuses_images():
    model, inputs = make("llava")  # one image per sample
    refused = pytest.raises(ValueError, match=r"video clips only.*3 image\(s\).*random_proj")
    with tm.patched(model, tm.get_method("frame_subsample", ratio=0.5)), torch.no_grad(), refused:
        model(**inputs)


def _clips(frames: list[int], rows: int = 2, cols: int = 3, newline: bool = True):
    """VisualTokens of clips of `frames` frames of a rows x cols grid each, right-padded, the
    first clip ending in a protected token."""
    from tokenmerge.methods.projector import VisualTokens

    per = rows * cols
    n = max(frames) * per + 1
    u = len(frames)
    valid = torch.zeros(u, n, dtype=torch.bool)
    prot = torch.zeros_like(valid)
    part = torch.full((u, n), -1)
    coord = torch.full((u, n, 2), -1)
    for j, f in enumerate(frames):
        valid[j, : f * per] = True
        ar = torch.arange(f * per)
        part[j, : f * per] = ar // per
        coord[j, : f * per] = torch.stack([(ar % per) // cols, ar % cols], -1)
        if newline and j == 0:
            valid[j, f * per] = prot[j, f * per] = True
    grid = torch.tensor([rows, cols]).expand(u, max(frames), 2)
    x = torch.randn(u, n, 4, generator=torch.Generator().manual_seed(0))
    return VisualTokens(x, valid, prot, coord, part, grid, frames=torch.tensor(frames))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75, 0.9, 0.99])
def test_frame_subsample_matches_reference(ratio):
    """Reference: K = clamp(round(F keep / m), 1, F) frames, the middle frame of each of K equal
    segments, every token of those frames kept, protected tokens kept, padding dropped."""
    from tokenmerge.methods.projector import FrameSubsample

    frames = [1, 2, 3, 5, 8, 12, 7]
    v = _clips(frames)
    method = FrameSubsample(ratio=ratio)
    cand = v.candidates
    keep = method.keep_count(cand.sum(1))
    red = method.select(v, keep)
    _, kept = red.destination()
    for j, f in enumerate(frames):
        m = int(cand[j].sum())
        k = max(1, min(f, round(f * int(keep[j]) / m)))
        segment = f / k
        chosen = {int((i + 0.5) * segment) for i in range(k)}
        assert len(chosen) == k
        for t in range(v.x.shape[1]):
            if not v.valid[j, t]:
                want = False
            elif v.protected[j, t]:
                want = True
            else:
                want = int(v.part[j, t]) in chosen
            assert bool(kept[j, t]) == want, (f, k, t)
    # a pruning: each kept token's value is its own
    out, size = red.apply(v.x, v.valid.float())
    got = out[size > 0]
    torch.testing.assert_close(got, v.x[kept & v.valid])
