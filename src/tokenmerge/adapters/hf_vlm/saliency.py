"""The vision tower's attention at the feature layer: which visual tokens it attends to.

VisionZip and Recoverable Compression rank visual tokens by the attention the vision tower's
CLS token pays them at the layer the VLM reads its features from (LLaVA's
``vision_feature_layer``). Forward hooks capture that layer's queries and keys; the CLS row is
``a_j = mean_h softmax(q_cls K_hᵀ / √d)_j`` (one row per head, ``O(N)``). Towers without a CLS
token (SigLIP) use the mean attention each token receives, ``mean_{h,i} softmax(Q_h K_hᵀ/√d)_ij``.
The per-tile maps are then arranged like the visual tokens themselves, by the model's own
``pack_image_features`` for LLaVA-NeXT / OneVision (unpadding, row newlines, interpolation).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..base import ContextSlot, UnsupportedModelError
from ..hf_vision import tower_layers


class Saliency:
    """Captures the feature layer's queries and keys of one VLM's vision tower."""

    def __init__(self, base: nn.Module, tower: nn.Module, layout: str) -> None:
        cfg = base.config
        self.base, self.layout = base, layout
        if layout == "mrope":
            self.error: str | None = (
                f"{type(tower).__name__} (Qwen2-VL's tower) has no CLS token and windowed, "
                "rotary attention; the hf-vlm adapter reads vision attention from LLaVA-family "
                "towers (CLIP, SigLIP, DINOv2) only"
            )
            return
        family, spec, layers = tower_layers(tower)
        feat = cfg.vision_feature_layer
        if not isinstance(feat, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={feat!r}: saliency needs one feature layer"
            )
        idx = len(layers) + feat if feat < 0 else feat - 1
        self.error = None if idx >= 0 else "the feature layer is the patch embedding"
        self.layer = layers[max(idx, 0)]
        self.spec = spec
        self.has_cls = family != "hf-siglip-vision"
        self.drop_cls = self.has_cls and cfg.vision_feature_select_strategy == "default"
        self.captured = ContextSlot(f"tokenmerge_saliency_{id(self)}")
        # LLaVA-NeXT's image sizes, from its get_image_features call: generate encodes the
        # images before the first forward and passes only the features to it
        self.sizes = ContextSlot(f"tokenmerge_image_sizes_{id(self)}")

    def wrap_image_features(self, original: Any) -> Any:
        """``get_image_features`` that records its ``image_sizes`` (LLaVA-NeXT/OneVision)."""
        sig = inspect.signature(original)

        @functools.wraps(original)  # generate reads its signature to route the pixel arguments
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            self.sizes.set(sig.bind(*args, **kwargs).arguments.get("image_sizes"))
            return original(*args, **kwargs)

        return get_image_features

    def hooks(self) -> list[tuple[nn.Module, Any]]:
        """``(module, factory)`` forward hooks capturing the feature layer's queries/keys."""
        if self.error is not None:
            return []
        return [
            (self.spec.q(self.layer), lambda p: self._keep("q")),
            (self.spec.k(self.layer), lambda p: self._keep("k")),
        ]

    def _keep(self, which: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            got = self.captured.get() or {}
            got[which] = output.detach()
            self.captured.set(got)

        return hook

    def take(self) -> Tensor | None:
        """``[tiles, N]`` attention per captured tile (cleared), or ``None``."""
        got = self.captured.get()
        self.captured.set(None)
        if not got or "q" not in got or "k" not in got:
            return None
        q, k = got["q"], got["k"]
        t, n, c = k.shape
        heads = self.spec.heads(self.layer)
        scale = self.spec.scale(self.layer)
        k = k.view(t, n, heads, c // heads).transpose(1, 2).float()
        q = q.view(t, n, heads, c // heads).transpose(1, 2).float()
        if self.has_cls:
            a = torch.softmax((q[:, :, :1] @ k.transpose(-2, -1)) * scale, -1)[:, :, 0]
            sal = a.mean(1)
        else:
            sal = torch.softmax((q @ k.transpose(-2, -1)) * scale, -1).mean(2).mean(1)
        return sal[:, 1:] if self.drop_cls else sal

    def per_image(self, sal: Tensor) -> list[Tensor]:
        """The tile maps arranged like each image's visual tokens: ``[tokens]`` per image."""
        if self.layout == "grid":
            return list(sal)
        image_sizes = self.sizes.get()
        self.sizes.set(None)
        if image_sizes is None:
            raise RuntimeError("get_image_features ran without image_sizes")
        mod = sys.modules[type(self.base).__module__]
        cfg = self.base.config
        counts = [
            mod.image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=cfg.image_grid_pinpoints,
                patch_size=cfg.vision_config.image_size,
            )
            for size in image_sizes
        ]
        tiles = list(torch.split(sal[..., None], counts))
        kw = {"image_features": tiles, "image_sizes": image_sizes}
        params = inspect.signature(self.base.pack_image_features).parameters
        kw["image_newline"] = sal.new_zeros(1)
        if "vision_feature_select_strategy" in params:
            kw["vision_feature_select_strategy"] = cfg.vision_feature_select_strategy
        packed = self.base.pack_image_features(**kw)[0]
        return [p[:, 0] for p in packed]
