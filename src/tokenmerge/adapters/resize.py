"""Input downsampling as part of a patch: the pixels are resized before the patch embedding.

A smaller input is the cheapest token reduction there is (every layer sees fewer tokens, with
no matching cost), and on natural photos it often beats merging at equal speed. A patch made
with ``input_scale`` (``tm.apply(model, method, input_scale=0.75)``, or an autotuned
:class:`~tokenmerge.tune.Plan`) resizes the image batch on entry, so the caller keeps feeding
images of the model's own size:

- each side becomes ``round(side · scale / p) · p`` pixels (``p`` the patch size, at least one
  patch), by antialiased bicubic interpolation of the normalised pixels;
- the position table is interpolated the way the framework does it: transformers' models
  get ``interpolate_pos_encoding=True`` where their ``forward`` takes it (DINOv2 always
  interpolates), timm's need ``dynamic_img_size=True`` (refused otherwise, before any forward).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.budget import as_float
from .base import Target

PIXEL_KWARGS = ("pixel_values", "x")


def check_input_scale(model: nn.Module, target: Target, scale: Any) -> float:
    """``scale`` as a float in (0, 1], after checking that ``model`` can run smaller inputs.

    Raises:
        ValueError: a model without a patch embedding (text, LLMs), or a timm model built
            without ``dynamic_img_size``.
    """
    s = as_float(scale, "input_scale", lo=0.0, hi=1.0, lo_open=True, hint=" (each side's fraction)")
    if target.grid_from is None:
        raise ValueError(
            f"input_scale resizes images, but the {target.family} adapter has no patch "
            "embedding to feed them to; it applies to vision models only"
        )
    if target.family.startswith("timm") and not getattr(model, "dynamic_img_size", False):
        raise ValueError(
            "input_scale needs a timm model that runs other input sizes: create it with "
            "timm.create_model(..., dynamic_img_size=True)"
        )
    return s


def patch_size(target: Target) -> int:
    """The patch side in pixels (the stride of the patch-embedding convolution)."""
    conv = target.grid_from
    stride = getattr(conv, "stride", None)
    if not stride:
        raise ValueError(f"the {target.family} patch embedding has no stride to read")
    return int(stride[0])


def scaled_side(side: int, scale: float, patch: int) -> int:
    """``side · scale`` rounded to a whole number of patches (at least one)."""
    return max(patch, round(side * scale / patch) * patch)


def resize_hook(
    model: nn.Module, target: Target, scale: float, done: Callable[[], None]
) -> Callable:
    """A forward pre-hook (with kwargs) on ``model`` that resizes its pixel input and calls
    ``done()`` (the patch checks that every forward went through it)."""
    patch = patch_size(target)
    params = inspect.signature(model.forward).parameters
    interpolate = "interpolate_pos_encoding" in params

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        key = next((k for k in PIXEL_KWARGS if isinstance(kwargs.get(k), Tensor)), None)
        pixels = kwargs[key] if key is not None else (args[0] if args else None)
        if not isinstance(pixels, Tensor) or pixels.dim() != 4:
            raise ValueError(
                "input_scale: expected the images as the first argument or pixel_values=, a "
                f"[B, C, H, W] tensor, got {type(pixels).__name__}"
            )
        h, w = pixels.shape[-2:]
        size = (scaled_side(h, scale, patch), scaled_side(w, scale, patch))
        if size != (h, w):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True)
        if key is not None:
            kwargs = {**kwargs, key: pixels}
        else:
            args = (pixels, *args[1:])
        if interpolate:
            kwargs = {**kwargs, "interpolate_pos_encoding": True}
        done()
        return args, kwargs

    return hook
