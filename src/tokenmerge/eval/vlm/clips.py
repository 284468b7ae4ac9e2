"""Synthetic video clips: coloured shapes on textile photos that move, change colour or appear.

Every clip is ``F`` frames (8 to 32) of 224x224 RGB rendered with PIL from a seed, with one
event, and questions with one-word answers from a fixed answer set per question type, so
chance is known (`chance`):

- ``change``: "What changed in the video?" -> ``position`` (a shape moved), ``colour`` (a
  shape changed colour) or ``count`` (shapes appeared);
- ``motion``: "Which way did the red square move?" -> ``left`` / ``right`` / ``up`` / ``down``
  (clips where a shape moved);
- ``appeared``: "How many shapes appeared?" -> ``1`` to ``3`` (clips where shapes appeared);
- ``start_colour`` / ``end_colour``: "What colour was the circle at the start?" / "... at the
  end?" (6 colours; in a colour-change clip the two differ).

The shapes, colours and textile photos are those of :mod:`.scenes`; the ``train`` and ``test``
splits use disjoint photos and different random streams.

>>> clip = make_clip(0, split="test")
>>> len(clip.frames), clip.event, clip.qas[0].question, clip.qas[0].answer
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .scenes import (
    _SPLITS,
    COLOURS,
    QA,
    SHAPES,
    Shape,
    _background,
    _draw,
    _pick,
    _place,
    _ref,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["CLIP_KINDS", "EVENTS", "FRAMES", "Clip", "answer_sets", "chance", "make_clip"]

CLIP_KINDS: tuple[str, ...] = ("change", "motion", "appeared", "start_colour", "end_colour")
#: the event of a clip -> the answer to "What changed in the video?"
EVENTS: dict[str, str] = {"move": "position", "recolour": "colour", "appear": "count"}
FRAMES: tuple[int, ...] = (8, 16, 24, 32)
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_TRAVEL = 80  # px a moving shape travels over the clip


@dataclass(frozen=True)
class Clip:
    """Rendered frames, the shapes in the first and the last frame (matched by index; a shape
    that appears later is in ``last`` only), the event and every question the clip answers."""

    frames: tuple[Image.Image, ...]
    first: tuple[Shape, ...]
    last: tuple[Shape, ...]
    event: str  # one of EVENTS
    qas: tuple[QA, ...]


def answer_sets() -> dict[str, tuple[str, ...]]:
    """The fixed answer set of each question type."""
    colours = tuple(COLOURS)
    return {
        "change": tuple(EVENTS.values()),
        "motion": tuple(_DIRECTIONS),
        "appeared": ("1", "2", "3"),
        "start_colour": colours,
        "end_colour": colours,
    }


def chance() -> dict[str, float]:
    """Accuracy of a uniform guess within each type's answer set."""
    return {k: 1.0 / len(v) for k, v in answer_sets().items()}


def _name(shapes: tuple[Shape, ...], s: Shape) -> str | None:
    """``the <colour> <shape>`` when no other shape has both, else None."""
    same = sum(o.shape == s.shape and o.colour == s.colour for o in shapes)
    return f"the {s.colour} {s.shape}" if same == 1 else None


def _moved(box: tuple[int, int, int, int], dx: int, dy: int) -> tuple[int, int, int, int]:
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def make_clip(index: int, split: str = "train", seed: int = 0, frames: int | None = None) -> Clip:
    """Clip number `index` of a split (``frames``: its length; default drawn from `FRAMES`).
    The same arguments always give the same clip."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if frames is not None and not 2 <= frames <= 64:
        raise ValueError(f"frames must be from 2 to 64, got {frames}")
    rng = np.random.default_rng([seed, _SPLITS[split], index, 7])
    n_frames = frames or FRAMES[int(rng.integers(len(FRAMES)))]
    background = _background(rng, split)
    event = list(EVENTS)[int(rng.integers(len(EVENTS)))]
    # a moving shape needs its whole path free: place it (as its path's bounding box) first
    taken: list[tuple[int, int, int, int]] = []
    first: list[Shape] = []
    path = None
    if event == "move":
        direction = list(_DIRECTIONS)[int(rng.integers(len(_DIRECTIONS)))]
        dx, dy = (_TRAVEL * d for d in _DIRECTIONS[direction])
        side = int(rng.integers(36, 49))
        span = _place(rng, side + _TRAVEL, [])  # a square that holds the whole path
        assert span is not None  # the first placement on an empty image always fits
        x0 = span[0] + (_TRAVEL if dx < 0 else 0)  # moving left: start at the right end
        y0 = span[1] + (_TRAVEL if dy < 0 else 0)
        box = (x0, y0, x0 + side, y0 + side)
        first.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], _pick(rng, COLOURS), box))
        taken.append(span)
        path = (direction, dx, dy)
    for _ in range(int(rng.integers(1, 3))):  # shapes that stay where they are
        box = _place(rng, int(rng.integers(36, 49)), taken)
        if box is not None:
            first.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], _pick(rng, COLOURS), box))
            taken.append(box)
    last = list(first)
    when: list[int] = [0] * len(first)  # the frame each shape shows up in
    j, switch = int(rng.integers(len(first))), 0  # the shape the colour questions ask about
    if event == "recolour":
        new = [c for c in COLOURS if c != first[j].colour]
        last[j] = replace(first[j], colour=new[int(rng.integers(len(new)))])
        switch = int(rng.integers(n_frames // 4, 3 * n_frames // 4 + 1))
    elif event == "move":
        _, dx, dy = path
        last[0] = replace(first[0], box=_moved(first[0].box, dx, dy))
    else:  # appear: 1 to 3 shapes show up between the second frame and three quarters in
        for _ in range(int(rng.integers(1, 4))):
            box = _place(rng, int(rng.integers(36, 49)), taken)
            if box is None:
                break
            last.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], _pick(rng, COLOURS), box))
            when.append(int(rng.integers(1, max(2, 3 * n_frames // 4 + 1))))
            taken.append(box)
    rendered = []
    from PIL import ImageDraw

    for t in range(n_frames):
        im = background.copy()
        draw = ImageDraw.Draw(im)
        for k, s in enumerate(last):
            if t < when[k]:
                continue
            if event == "move" and k == 0:
                f = t / (n_frames - 1)
                s = replace(first[0], box=_moved(first[0].box, round(f * dx), round(f * dy)))
            elif event == "recolour" and k == j and t < switch:
                s = first[k]
            _draw(draw, s)
        rendered.append(im)
    qas = _questions(event, tuple(first), tuple(last), path, j)
    return Clip(tuple(rendered), tuple(first), tuple(last), event, qas)


def _questions(event, first, last, path, j: int) -> tuple[QA, ...]:
    """The clip's questions; the colour ones ask about shape `j` (the recoloured one in a
    colour-change clip), named by its shape when that is unique."""
    qas = [QA("change", "What changed in the video?", EVENTS[event])]
    if event == "move" and (name := _name(first, first[0])) is not None:
        qas.append(QA("motion", f"Which way did {name} move?", path[0]))
    if event == "appear":
        qas.append(QA("appeared", "How many shapes appeared?", str(len(last) - len(first))))
    if ref := _ref(last, first[j], "shape"):
        qas.append(QA("start_colour", f"What colour was {ref} at the start?", first[j].colour))
        qas.append(QA("end_colour", f"What colour was {ref} at the end?", last[j].colour))
    return tuple(qas)
