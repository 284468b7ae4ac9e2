"""Merge groups drawn on the input image (as in ToMe's figure 4).

Every original patch is painted with the mean colour of the group it ended up in, and group
borders are drawn in white, so large uniform regions show up as big merged patches.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import torch

from ..core.state import TokenState


def groups(state: TokenState, sample: int = 0) -> np.ndarray:
    """``[h, w]`` final token index of every patch (the largest-weight destination)."""
    if state.grid is None:
        raise ValueError("the token state has no patch grid (not an image model?)")
    h, w = state.grid
    src = state.source
    best = src.weight[sample].argmax(-1, keepdim=True)
    dest = src.index[sample].gather(-1, best).squeeze(-1)
    alive = src.weight[sample].gather(-1, best).squeeze(-1) > 0
    dest = torch.where(alive, dest, -1)  # pruned patches: -1
    return dest[state.n_prefix :].reshape(h, w).cpu().numpy()


def overlay(image: np.ndarray, group_map: np.ndarray) -> np.ndarray:
    """Paint ``image`` (``[H, W, 3]`` uint8, H and W multiples of the grid) by merge group."""
    gh, gw = group_map.shape
    hh, ww = image.shape[0] // gh, image.shape[1] // gw
    img = image[: gh * hh, : gw * ww].astype(np.float64)
    cells = img.reshape(gh, hh, gw, ww, 3).mean((1, 3))  # mean colour of each patch
    out = np.empty_like(cells)
    for g in np.unique(group_map):
        m = group_map == g
        out[m] = cells[m].mean(0) if g >= 0 else 0.0  # pruned patches are black
    big = np.repeat(np.repeat(out, hh, 0), ww, 1)
    gm = np.repeat(np.repeat(group_map, hh, 0), ww, 1)
    edge = np.zeros(gm.shape, dtype=bool)
    edge[1:] |= gm[1:] != gm[:-1]
    edge[:, 1:] |= gm[:, 1:] != gm[:, :-1]
    big[edge] = 255.0
    return big.clip(0, 255).astype(np.uint8)


def letterbox_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a ``width x height`` image fitted, aspect kept, into a
    ``size x size`` square (longest side to ``size``, centred)."""
    s = size / max(width, height)
    w, h = max(1, round(width * s)), max(1, round(height * s))
    return (size - w) // 2, (size - h) // 2, w, h


def letterbox(image: Any, size: int) -> tuple[Any, tuple[int, int, int, int]]:
    """A PIL image padded (black) to a ``size x size`` square, not cropped, so that every part
    of it reaches the model; and its box (:func:`letterbox_box`) in the square."""
    from PIL import Image

    box = letterbox_box(*image.size, size)
    left, top, w, h = box
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), (left, top))
    return canvas, box


def captioned(image: np.ndarray, caption: str) -> np.ndarray:
    """``image`` (``[H, W, 3]`` uint8) with ``caption`` written in a white strip below it."""
    from PIL import Image, ImageDraw, ImageFont

    try:  # Pillow's scalable default font; its bitmap font at the default size runs words together
        font: Any = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    width = image.shape[1]
    lines = textwrap.wrap(caption, max(20, width // 7)) or [""]  # ~7 px per character
    strip = Image.new("RGB", (width, 6 + 16 * len(lines)), "white")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 16 * i), line, fill="black", font=font)
    return np.concatenate([image, np.asarray(strip)], 0)


def save_overlay(
    image: np.ndarray,
    state: TokenState,
    path: str,
    sample: int = 0,
    caption: str | None = None,
) -> str:
    """Write the overlay next to the original image as one PNG, with ``caption`` (method,
    budget, tokens left) below when given; returns ``path``."""
    from PIL import Image

    painted = overlay(image, groups(state, sample))
    side = np.concatenate([image[: painted.shape[0], : painted.shape[1]], painted], 1)
    if caption:
        side = captioned(side, caption)
    Image.fromarray(side).save(path)
    return path
