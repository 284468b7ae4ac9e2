"""Merge groups drawn on the input image (as in ToMe's figure 4).

Every original patch is painted with the mean colour of the group it ended up in, and group
borders are drawn in white, so large uniform regions show up as big merged patches.
"""

from __future__ import annotations

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


def save_overlay(image: np.ndarray, state: TokenState, path: str, sample: int = 0) -> str:
    """Write the overlay next to the original image as one PNG; returns ``path``."""
    from PIL import Image

    painted = overlay(image, groups(state, sample))
    side = np.concatenate([image[: painted.shape[0], : painted.shape[1]], painted], 1)
    Image.fromarray(side).save(path)
    return path
