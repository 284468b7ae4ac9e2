"""Where each image's (or video's) visual tokens sit in the LLM's input, and their grid
coordinates.

Read once per prefill from ``input_ids`` (the image and video placeholders), and for
LLaVA-NeXT / OneVision from the embeddings themselves: their row-end ``image_newline`` tokens
are exact copies of one learned vector, so the tile grid's shape is read off the sequence
instead of being recomputed from the processor's resolution rules (which differ between
versions).

A **unit** is what a projector method reduces as one row: an image, or a video clip. In a clip
every frame is one part (``part`` = frame index, ``grid`` = each frame's grid), so pooling
never mixes frames and video methods find the same position in every frame by its ``coord``:

- LLaVA-1.5 (no video input of its own): images given back to back (their placeholders
  adjacent, with no text between) are one clip, each image a frame;
- LLaVA-OneVision: a run of video placeholders is ``F`` frames of its 2x2-pooled grid
  (``ceil(side / 2)`` per side), then one ``image_newline`` token (protected);
- Qwen2-VL / Qwen2.5-VL: a video's frames are its temporal patches, told apart by the
  temporal M-RoPE position (Qwen2.5-VL spaces them by ``second_per_grid_t`` ticks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: part ids: the base image, and LLaVA-NeXT's tiles
BASE, TILES = 0, 1


@dataclass
class Units:
    """The images of one forward, one per row (right-padded to ``n``).

    Attributes:
        sample: ``[U]`` the batch row each image belongs to.
        index: ``[U, n]`` input position of each token (0 for padding).
        valid, protected, coord, part, grid, frames: as in
            :class:`~tokenmerge.methods.projector.VisualTokens`.
    """

    sample: Tensor
    index: Tensor
    valid: Tensor
    protected: Tensor
    coord: Tensor
    part: Tensor
    grid: Tensor
    frames: Tensor

    def __len__(self) -> int:
        return int(self.sample.shape[0])


@dataclass
class _Image:
    sample: int
    start: int  # input position of its first token
    protected: list[bool]
    coord: list[tuple[int, int]]
    part: list[int]
    grid: list[tuple[int, int]]  # per part
    frames: int = 1  # a video clip's frames (its parts), 1 for an image


def _raster(rows: int, cols: int, part: int) -> tuple[list, list, list]:
    coord = [(i // cols, i % cols) for i in range(rows * cols)]
    return [False] * (rows * cols), coord, [part] * (rows * cols)


def _grid_image(b: int, start: int, side: int, cls: bool) -> _Image:
    prot, coord, part = _raster(side, side, BASE)
    if cls:  # vision_feature_select_strategy="full": the CLS token leads, kept as is
        prot, coord, part = [True, *prot], [(-1, -1), *coord], [-1, *part]
    return _Image(b, start, prot, coord, part, [(side, side)])


def runs(mask: Tensor) -> list[list[tuple[int, int]]]:
    """Per sample, the ``(start, stop)`` input positions of each run of image tokens."""
    out = []
    for row in mask.cpu():
        pos = row.nonzero().flatten().tolist()
        spans: list[tuple[int, int]] = []
        for p in pos:
            if spans and spans[-1][1] == p:
                spans[-1] = (spans[-1][0], p + 1)
            else:
                spans.append((p, p + 1))
        out.append(spans)
    return out


def grid_images(spans: list[list[tuple[int, int]]], side: int, cls: bool) -> list[_Image]:
    """LLaVA-1.5: every image is ``side x side`` tokens (plus CLS with the "full" strategy);
    a run of several images back to back is one clip whose frames are those images."""
    per = side * side + int(cls)
    images = []
    for b, row in enumerate(spans):
        for start, stop in row:
            if (stop - start) % per:
                raise ValueError(
                    f"a run of {stop - start} image tokens is not a whole number of images of "
                    f"{per} tokens (vision_config.image_size / patch_size = {side} per side): "
                    "the prompt's image placeholders or the config's image_size do not match "
                    "the images the model is given"
                )
            frames = (stop - start) // per
            img = _grid_image(b, start, side, cls)
            for f in range(1, frames):
                _add_frame(img, _grid_image(b, start, side, cls), f)
            images.append(img)
    return images


def _add_frame(clip: _Image, frame: _Image, f: int) -> None:
    """Append `frame` (one part) to `clip` as its part `f`."""
    clip.protected += frame.protected
    clip.coord += frame.coord
    clip.part += [f if p >= 0 else -1 for p in frame.part]
    clip.grid += frame.grid
    clip.frames += 1


def anyres_images(
    spans: list[list[tuple[int, int]]],
    newline: Tensor,
    side: int,
    cls: bool,
    video: Tensor | None = None,
) -> list[_Image]:
    """LLaVA-NeXT / OneVision: each image is its base grid (``side x side``), then its tiles'
    grid (rows of ``cols`` tokens, each row ended by a newline token), or, for an image
    without tiles, one newline token. A run of video tokens (``video``) is a clip
    (:func:`video_clip`)."""
    base = side * side + int(cls)
    images = []
    for b, row in enumerate(spans):
        for start, stop in row:
            if video is not None and bool(video[b, start]):
                images.append(video_clip(b, start, stop, newline[b, start:stop], side, cls))
                continue
            flags = newline[b, start:stop].tolist()
            cur = 0
            while cur < len(flags):
                img = _grid_image(b, start + cur, side, cls)
                cur += base
                if cur >= len(flags):
                    raise ValueError("an image's tokens end before its newline tokens")
                if flags[cur]:  # no tiles: one newline after the base grid
                    img.protected.append(True)
                    img.coord.append((-1, -1))
                    img.part.append(-1)
                    cur += 1
                else:
                    cols = flags[cur:].index(True) if True in flags[cur:] else -1
                    if cols < 0:
                        raise ValueError("the tiles of an image have no newline token")
                    rows = 0
                    while cur + (rows + 1) * (cols + 1) <= len(flags):
                        row_flags = flags[cur + rows * (cols + 1) : cur + (rows + 1) * (cols + 1)]
                        if row_flags != [False] * cols + [True]:
                            break
                        rows += 1
                    for r in range(rows):
                        for c in range(cols + 1):
                            img.protected.append(c == cols)
                            img.coord.append((r, c) if c < cols else (-1, -1))
                            img.part.append(TILES if c < cols else -1)
                    img.grid.append((rows, cols))
                    cur += rows * (cols + 1)
                images.append(img)
    return images


def video_clip(b: int, start: int, stop: int, newline: Tensor, side: int, cls: bool) -> _Image:
    """LLaVA-OneVision's video: ``F`` frames of the ``ceil(side / 2)``-per-side grid that its
    2x2 bilinear pooling leaves, then one ``image_newline`` token."""
    if cls:
        raise ValueError(
            "LLaVA-OneVision pools video frames on the patch grid, which needs "
            "vision_feature_select_strategy='default' (no CLS token)"
        )
    pooled = -(-side // 2)
    per = pooled * pooled
    n = stop - start
    if n < per + 1 or (n - 1) % per or not bool(newline[-1]) or bool(newline[:-1].any()):
        raise ValueError(
            f"a run of {n} video tokens is not whole frames of {pooled}x{pooled} pooled tokens "
            "followed by one image_newline token"
        )
    clip = _grid_image(b, start, pooled, False)
    for f in range(1, (n - 1) // per):
        _add_frame(clip, _grid_image(b, start, pooled, False), f)
    clip.protected.append(True)
    clip.coord.append((-1, -1))
    clip.part.append(-1)
    return clip


def mrope_images(spans: list[list[tuple[int, int]]], position_ids: Tensor) -> list[_Image]:
    """Qwen2-VL: each run of image or video tokens (the processor wraps each in vision start /
    end tokens) is ``t x h x w`` merged patches in raster order, and its M-RoPE position ids
    ``(t, h, w)`` (``position_ids[-3:]``, as the model computed them) are its grid
    coordinates. A video's frames (its ``t`` temporal patches) are told apart by their
    distinct temporal positions, whatever their spacing."""
    thw = position_ids[-3:].cpu()
    images = []
    for b, row in enumerate(spans):
        for start, stop in row:
            p = thw[:, b, start:stop]
            frame = torch.unique(p[0], return_inverse=True)[1]
            p = p[1:] - p[1:].amin(1, keepdim=True)
            t = int(frame.max()) + 1
            h, w = (int(v) + 1 for v in p.amax(1))
            n = stop - start
            if t * h * w != n:
                raise ValueError(
                    f"{n} image tokens whose M-RoPE positions span a {t}x{h}x{w} grid: one "
                    "image or video per vision start/end pair is expected"
                )
            coord = list(zip(p[0].tolist(), p[1].tolist(), strict=True))
            img = _Image(b, start, [False] * n, coord, frame.tolist(), [(h, w)] * t, frames=t)
            images.append(img)
    return images


def pack(images: list[_Image], device: torch.device) -> Units:
    """The images as padded tensors."""
    u = len(images)
    n = max((len(i.protected) for i in images), default=0)
    p = max((len(i.grid) for i in images), default=1)
    index = torch.zeros(u, n, dtype=torch.long)
    valid = torch.zeros(u, n, dtype=torch.bool)
    prot = torch.zeros(u, n, dtype=torch.bool)
    coord = torch.full((u, n, 2), -1, dtype=torch.long)
    part = torch.full((u, n), -1, dtype=torch.long)
    grid = torch.zeros(u, p, 2, dtype=torch.long)
    frames = torch.tensor([i.frames for i in images], dtype=torch.long)
    for j, img in enumerate(images):
        m = len(img.protected)
        index[j, :m] = torch.arange(img.start, img.start + m)
        valid[j, :m] = True
        prot[j, :m] = torch.tensor(img.protected)
        coord[j, :m] = torch.tensor(img.coord, dtype=torch.long)
        part[j, :m] = torch.tensor(img.part, dtype=torch.long)
        grid[j, : len(img.grid)] = torch.tensor(img.grid, dtype=torch.long)
    sample = torch.tensor([i.sample for i in images], dtype=torch.long)
    fields = (sample, index, valid, prot, coord, part, grid, frames)
    return Units(*(t.to(device) for t in fields))
