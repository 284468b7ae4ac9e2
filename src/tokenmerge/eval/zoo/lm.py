"""Causal LMs from GGUF files (SmolLM2-135M, Qwen2.5-Coder-0.5B in six parts): assembled,
checked, dequantised to float32 once and cached with ``save_pretrained``; hub names."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import cache_is_valid, write_conversion
from .sources import (
    _QWEN_CODER_PARTS,
    _QWEN_CODER_SHA256,
    _SMOLLM2_GGUF,
    _Asset,
    _asset_file,
    _require,
    _split_hub,
    cache_dir,
    sha256_file,
    verify_sha256,
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
    manifest records ``source_sha`` and every file's sha256 (:func:`.convert.cache_is_valid`)."""
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

    def write(tmp: Path) -> None:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    write_conversion(folder, source_sha, write)


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
    if not cache_is_valid(folder, spec.sha256):
        gguf = _gguf_file(spec)
        _convert_gguf(gguf, folder, spec.sha256)
        if len(spec.parts) > 1:
            gguf.unlink(missing_ok=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(folder))
