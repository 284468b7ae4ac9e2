"""The synthetic video clips (issue 14's measuring task): deterministic, splits apart, and every
answer read back from the rendered pixels."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmerge.eval.vlm import clips as vc
from tokenmerge.eval.vlm.scenes import COLOURS


def _at(frame, shape) -> tuple[int, int, int]:
    x, y = shape.centre  # inside the filled shape for every kind
    return tuple(int(v) for v in np.asarray(frame)[y, x])


def test_clips_are_deterministic_and_splits_differ():
    a, b = vc.make_clip(3, "test"), vc.make_clip(3, "test")
    assert a.qas == b.qas and a.first == b.first and a.event == b.event
    assert len(a.frames) == len(b.frames) in vc.FRAMES
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(a.frames, b.frames, strict=True)
    )
    assert all(f.size == (224, 224) and f.mode == "RGB" for f in a.frames)
    other = vc.make_clip(3, "train")
    assert not np.array_equal(np.asarray(a.frames[0]), np.asarray(other.frames[0]))
    assert len(vc.make_clip(5, "test", frames=12).frames) == 12
    with pytest.raises(ValueError, match="split must be"):
        vc.make_clip(0, "val")
    with pytest.raises(ValueError, match="frames must be from 2 to 64"):
        vc.make_clip(0, frames=1)


def test_answers_agree_with_the_frames():
    sets = vc.answer_sets()
    kinds, events = set(), set()
    for i in range(45):
        clip = vc.make_clip(i, "test", frames=8)
        start, end = clip.frames[0], clip.frames[-1]
        events.add(clip.event)
        for s in clip.first:
            assert _at(start, s) == COLOURS[s.colour]
        for s in clip.last:
            assert _at(end, s) == COLOURS[s.colour]
        new = clip.last[len(clip.first) :]
        for s in new:  # appeared later: not there at the start
            assert _at(start, s) != COLOURS[s.colour]
        changed = [
            k
            for k, (a, b) in enumerate(zip(clip.first, clip.last[: len(clip.first)], strict=True))
            if a != b
        ]
        if clip.event == "move":
            assert changed == [0] and not new
        elif clip.event == "recolour":
            assert len(changed) == 1 and not new
            k = changed[0]
            assert clip.first[k].colour != clip.last[k].colour
        else:
            assert not changed and 1 <= len(new) <= 3
        for qa in clip.qas:
            kinds.add(qa.kind)
            assert qa.answer in sets[qa.kind], qa
            if qa.kind == "change":
                assert qa.answer == vc.EVENTS[clip.event]
            elif qa.kind == "motion":
                (x0, y0), (x1, y1) = clip.first[0].centre, clip.last[0].centre
                dx, dy = x1 - x0, y1 - y0
                want = {"left": dx < 0 == dy, "right": dx > 0 == dy, "up": dy < 0 == dx,
                        "down": dy > 0 == dx}  # fmt: skip
                assert want[qa.answer], (qa, dx, dy)
                assert f"the {clip.first[0].colour} {clip.first[0].shape}" in qa.question
            elif qa.kind == "appeared":
                assert qa.answer == str(len(new))
            else:  # the named shape's colour in the first / last frame
                shape = qa.question.split(" was the ")[1].split(" at ")[0]
                frame, shapes = (
                    (start, clip.first) if qa.kind == "start_colour" else (end, clip.last)
                )
                (s,) = [s for s in shapes if s.shape == shape]
                assert _at(frame, s) == COLOURS[qa.answer]
    assert kinds == set(vc.CLIP_KINDS) and events == set(vc.EVENTS)


def test_answer_sets_and_chance():
    sets, chance = vc.answer_sets(), vc.chance()
    assert set(sets) == set(chance) == set(vc.CLIP_KINDS)
    assert chance["change"] == pytest.approx(1 / 3) and chance["motion"] == 0.25
    assert sets["appeared"] == ("1", "2", "3")
