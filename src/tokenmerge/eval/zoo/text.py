"""Text encoders: ``minilm`` (all-MiniLM-L6-v2) and hub names, as transformers models or
sentence-transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .sources import _MINILM_ASSETS, _asset_file, _require, _split_hub


def _minilm_dir() -> Path:
    """The MiniLM model folder, every file in it checked."""
    paths = [_asset_file(a) for a in _MINILM_ASSETS]  # all checked, not only the first
    return paths[0].parent


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
