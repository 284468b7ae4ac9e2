"""Synthetic visual question answering: coloured shapes and a Fashion-MNIST item on textile photos.

Every scene is a 224x224 RGB image rendered with PIL from a seed, plus questions with one-word
answers drawn from a fixed answer set per question type, so chance is known (`chance`):

- ``colour``: "What colour is the square?" (6 colours);
- ``shape``: "What shape is the red object?" (4 shapes);
- ``count``: "How many shapes are there?" (1 to 5, answered as a digit);
- ``position``: "Is the circle left or right of the star?" / "... above or below ..." (2);
- ``class``: "What clothing item is in the picture?" (the 10 Fashion-MNIST classes).

The ``train`` and ``test`` splits draw their backgrounds from disjoint textile photos and their
items from Fashion-MNIST's own train / test sets, and use different random streams.

>>> scenes = make_scenes(8, split="test")
>>> scenes[0].image, scenes[0].qas[0].question, scenes[0].qas[0].answer
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "COLOURS",
    "ITEMS",
    "KINDS",
    "QA",
    "SHAPES",
    "Scene",
    "Shape",
    "answer_sets",
    "chance",
    "make_scene",
    "make_scenes",
    "questions",
]

SIZE = 224
KINDS: tuple[str, ...] = ("colour", "shape", "count", "position", "class")
# Far apart in RGB, and all visible on the grey textiles.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Fashion-MNIST's classes in label order, as one lower-case word each.
ITEMS: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
MAX_SHAPES = 5
_SPLITS = {"train": 0, "test": 1}
_ITEM_SHARE = 0.6  # scenes with a clothing item
_MIN_GAP = 24  # px between centres along the axis a position question asks about


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its kind, colour name and bounding box ``(x0, y0, x1, y1)`` in pixels.
    The box centre lies inside the filled shape for every kind."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


@dataclass(frozen=True)
class QA:
    """A question, its one-word answer and its type (one of `KINDS`)."""

    kind: str
    question: str
    answer: str


@dataclass(frozen=True)
class Scene:
    """A rendered image, what it shows, and every question it can answer."""

    image: Image.Image
    shapes: tuple[Shape, ...]
    item: str | None  # the Fashion-MNIST class name, or None when no item is pasted
    item_box: tuple[int, int, int, int] | None
    qas: tuple[QA, ...]


def answer_sets() -> dict[str, tuple[str, ...]]:
    """The fixed answer set of each question type."""
    return {
        "colour": tuple(COLOURS),
        "shape": SHAPES,
        "count": tuple(str(i) for i in range(1, MAX_SHAPES + 1)),
        "position": ("left", "right", "above", "below"),
        "class": ITEMS,
    }


def chance() -> dict[str, float]:
    """Accuracy of a uniform guess within each type's answer set (a position question offers
    two answers, left/right or above/below)."""
    return {k: (0.5 if k == "position" else 1.0 / len(v)) for k, v in answer_sets().items()}


@functools.lru_cache(maxsize=2)
def _textiles(split: str) -> tuple[Image.Image, ...]:
    """Background photos: a fixed draw of 400 textiles, every 4th one held out for ``test``."""
    from ..data import textiles

    images = textiles(n=400, seed=0)[0]
    held = split == "test"
    return tuple(im for i, im in enumerate(images) if (i % 4 == 3) == held)


@functools.lru_cache(maxsize=2)
def _items(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced Fashion-MNIST items from the split of the same name."""
    from ..data import fashion_mnist

    return fashion_mnist(split, n=3000 if split == "train" else 1000, seed=0)


def _background(rng: np.random.Generator, split: str) -> Image.Image:
    from PIL import Image

    pool = _textiles(split)
    im = pool[int(rng.integers(len(pool)))]
    x, y = (int(v) for v in rng.integers(0, im.width - SIZE + 1, size=2))
    im = im.crop((x, y, x + SIZE, y + SIZE))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im.rotate(90 * int(rng.integers(4)))


def _place(rng: np.random.Generator, side: int, taken: list[tuple[int, int, int, int]]):
    """A box of `side` px that keeps 6 px from every taken box, or None after 200 tries."""
    for _ in range(200):
        x0, y0 = (int(v) for v in rng.integers(4, SIZE - side - 4, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if all(
            box[2] + 6 <= t[0] or t[2] + 6 <= box[0] or box[3] + 6 <= t[1] or t[3] + 6 <= box[1]
            for t in taken
        ):
            return box
    return None


def _draw(draw, s: Shape) -> None:
    x0, y0, x1, y1 = s.box
    fill = COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse(s.box, fill=fill)
    elif s.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif s.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # a five-pointed star, inner radius 0.45 of the outer one
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon(
            [(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles, strict=True)],
            fill=fill,
        )


def _ref(shapes: tuple[Shape, ...], s: Shape, by: str) -> str | None:
    """A phrase naming `s` by its shape or its colour, if that is unique in the scene."""
    if by == "shape":
        return f"the {s.shape}" if sum(o.shape == s.shape for o in shapes) == 1 else None
    return f"the {s.colour} object" if sum(o.colour == s.colour for o in shapes) == 1 else None


def _questions(rng: np.random.Generator, shapes: tuple[Shape, ...], item: str | None):
    """Every question the scene answers unambiguously (at most 3 colour, 3 shape and 2
    position questions); several per image let training pay for the image tokens once."""
    qas: list[QA] = []
    order = [int(i) for i in rng.permutation(len(shapes))]
    for i in order[:3]:
        if ref := _ref(shapes, shapes[i], "shape"):
            qas.append(QA("colour", f"What colour is {ref}?", shapes[i].colour))
    for i in order[-3:]:
        if ref := _ref(shapes, shapes[i], "colour"):
            qas.append(QA("shape", f"What shape is {ref}?", shapes[i].shape))
    qas.append(QA("count", "How many shapes are there?", str(len(shapes))))
    pairs = [(a, b) for a in order for b in order if a < b]
    for a, b in [pairs[int(i)] for i in rng.permutation(len(pairs))]:
        if rng.random() < 0.5:
            a, b = b, a
        ra, rb = _ref(shapes, shapes[a], "shape"), _ref(shapes, shapes[b], "shape")
        (xa, ya), (xb, yb) = shapes[a].centre, shapes[b].centre
        axes = [ax for ax, d in (("x", xa - xb), ("y", ya - yb)) if abs(d) >= _MIN_GAP]
        if ra is None or rb is None or not axes:
            continue
        if axes[int(rng.integers(len(axes)))] == "x":
            answer, words = ("left" if xa < xb else "right"), "left or right of"
        else:
            answer, words = ("above" if ya < yb else "below"), "above or below"
        qas.append(QA("position", f"Is {ra} {words} {rb}?", answer))
        if sum(q.kind == "position" for q in qas) == 2:
            break
    if item is not None:
        qas.append(QA("class", "What clothing item is in the picture?", item))
    return tuple(qas)


def make_scene(index: int, split: str = "train", seed: int = 0) -> Scene:
    """Scene number `index` of a split: the same arguments always give the same scene."""
    from PIL import Image, ImageDraw

    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    image = _background(rng, split)
    taken: list[tuple[int, int, int, int]] = []
    item, item_box = None, None
    if rng.random() < _ITEM_SHARE:
        images, labels = _items(split)
        j = int(rng.integers(len(labels)))
        side = int(rng.integers(64, 97))
        item_box = _place(rng, side, taken)
        if item_box is not None:
            tile = Image.fromarray(images[j]).resize((side, side), Image.Resampling.BILINEAR)
            image.paste(tile.convert("RGB"), item_box[:2])
            item = ITEMS[int(labels[j])]
            taken.append(item_box)
    shapes: list[Shape] = []
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        box = _place(rng, int(rng.integers(36, 57)), taken)
        if box is None:  # no room left: the count question still counts what was drawn
            break
        s = Shape(SHAPES[int(rng.integers(len(SHAPES)))], _pick(rng, COLOURS), box)
        _draw(draw, s)
        shapes.append(s)
        taken.append(box)
    return Scene(image, tuple(shapes), item, item_box, _questions(rng, tuple(shapes), item))


def _pick(rng: np.random.Generator, options: dict[str, object]) -> str:
    names = list(options)
    return names[int(rng.integers(len(names)))]


def make_scenes(n: int, split: str = "train", seed: int = 0, start: int = 0) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of a split."""
    return [make_scene(i, split, seed) for i in range(start, start + n)]


def questions(scenes: list[Scene], seed: int = 0) -> list[tuple[int, QA]]:
    """One question of each type that a scene offers, as ``(scene index, QA)`` pairs: the
    held-out evaluation set (per-type counts stay close, since every scene offers a count)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[int, QA]] = []
    for i, scene in enumerate(scenes):
        for kind in KINDS:
            options = [q for q in scene.qas if q.kind == kind]
            if options:
                out.append((i, options[int(rng.integers(len(options)))]))
    return out
