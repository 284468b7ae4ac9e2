"""The vision tower's attention at the feature layer: which visual tokens it attends to.

VisionZip and Recoverable Compression rank visual tokens by the attention the vision tower's
CLS token pays them at the layer the VLM reads its features from (LLaVA's
``vision_feature_layer``). Forward hooks capture that layer's queries and keys; the CLS row is
``a_j = mean_h softmax(q_cls K_hᵀ / √d)_j`` (one row per head, ``O(N)``). Towers without a CLS
token (SigLIP) use the mean attention each token receives, ``mean_{h,i} softmax(Q_h K_hᵀ/√d)_ij``.
The per-tile maps are then arranged like the visual tokens themselves, by the model's own
``pack_image_features`` for LLaVA-NeXT / OneVision (unpadding, row newlines, interpolation).

Qwen2-VL's tower has no CLS token and reads its last block: there, each patch's saliency is the
mean attention it receives within the segments that block attends over (one per image, or
Qwen2.5-VL's windows), averaged over the ``m x m`` patches merged into one visual token, in the
image's own order (Qwen2.5-VL's window permutation undone).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..base import ContextSlot, UnsupportedModelError
from ..hf_vision import tower_layers


class Saliency:
    """Captures the feature layer's queries and keys of a LLaVA-family vision tower."""

    def __init__(self, base: nn.Module, tower: nn.Module, layout: str) -> None:
        cfg = base.config
        self.base, self.layout = base, layout
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

    def pre_hooks(self) -> list[tuple[nn.Module, Any]]:
        return []

    def post_hooks(self) -> list[tuple[nn.Module, Any]]:
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


class QwenSaliency:
    """Captures the last block's attention inputs of a Qwen2-VL / Qwen2.5-VL vision tower."""

    error: str | None = None

    def __init__(self, tower: nn.Module) -> None:
        self.tower = tower
        self.attn = tower.blocks[-1].attn
        self.merge = int(tower.spatial_merge_size)
        self.captured = ContextSlot(f"tokenmerge_saliency_{id(self)}")
        self.sizes = ContextSlot(f"tokenmerge_grid_thw_{id(self)}")

    def pre_hooks(self) -> list[tuple[nn.Module, Any]]:
        return [(self.tower, lambda p: self._grid), (self.attn, lambda p: self._inputs)]

    def post_hooks(self) -> list[tuple[nn.Module, Any]]:
        return []

    def _grid(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.sizes.set(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])

    def _inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        self.captured.set((h.detach(), cu, kwargs["position_embeddings"]))

    def take(self) -> Tensor | None:
        """``[patches / m²]`` mean attention received per visual token (cleared)."""
        got = self.captured.get()
        self.captured.set(None)
        if got is None:
            return None
        h, cu, (cos, sin) = got
        mod = sys.modules[type(self.attn).__module__]
        n = h.shape[0]
        qkv = self.attn.qkv(h).reshape(n, 3, self.attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = mod.apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H, n, d]
        bounds = cu.tolist()
        parts = []
        for a, b in itertools.pairwise(bounds):
            att = torch.softmax((q[:, a:b] @ k[:, a:b].transpose(-2, -1)) * self.attn.scaling, -1)
            parts.append(att.mean(1).mean(0))
        sal = torch.cat(parts).view(-1, self.merge**2).mean(1)
        if hasattr(self.tower, "fullatt_block_indexes"):  # Qwen2.5-VL: undo the window order
            sal = sal[torch.argsort(self._window_index())]
        return sal

    def _window_index(self) -> Tensor:
        cfg = self.tower.config
        mod = sys.modules[type(self.tower).__module__]
        grid = self.sizes.get()
        if hasattr(mod, "get_vision_window_index"):
            return mod.get_vision_window_index(
                grid,
                spatial_merge_size=self.merge,
                window_size=cfg.window_size,
                patch_size=cfg.patch_size,
            )[0]
        return self.tower.get_window_index(grid)[0]  # older transformers

    def per_image(self, sal: Tensor) -> list[Tensor]:
        grid = self.sizes.get()
        self.sizes.set(None)
        if grid is None:
            raise RuntimeError("the vision tower ran without grid_thw")
        counts = (grid.prod(-1) // self.merge**2).tolist()
        return list(torch.split(sal, counts))


def saliency_of(base: nn.Module, tower: nn.Module, layout: str) -> Saliency | QwenSaliency:
    """The saliency capture for a VLM's tower."""
    return QwenSaliency(tower) if layout == "mrope" else Saliency(base, tower, layout)
