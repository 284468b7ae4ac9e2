"""sentence-transformers models over a supported text encoder (:mod:`.hf_text` and the
families registered there: MPNet, ModernBERT).

A ``SentenceTransformer`` is patched through its ``Transformer`` module: the encoder's merged
token embeddings are copied back onto the original token grid before pooling, so every
sentence-transformers pooling mode keeps working on the tokenizer's ``attention_mask``. Mean
pooling over that grid is exactly the mean of the merged tokens weighted by their sizes; CLS
pooling reads the (protected, never merged) first token; max pooling sees each merged token
once per source token, which leaves the maximum unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .base import ADAPTERS, ATTR, Adapter, Target, UnsupportedModelError, class_names
from .hf_text import HFText, _family_of, _refusal, _text_target
from .patch import Patch

__all__ = ["SentenceTransformers"]


def _unmerge_tokens(module: nn.Module) -> Callable[[Patch], Callable[..., Any]]:
    """An instance ``forward`` for the ST ``Transformer`` module that copies the merged token
    embeddings back onto the tokenizer's grid, so pooling sees the original token layout."""
    name = getattr(module, "module_output_name", "token_embeddings")

    def factory(patch: Patch) -> Callable[..., Any]:
        forward_cls = type(module).forward

        def forward(features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            out = forward_cls(module, features, **kwargs)
            emb = out.get(name)
            st = patch.state
            if (
                isinstance(emb, Tensor)
                and emb.dim() == 3
                and st is not None
                and tuple(emb.shape[:2]) == tuple(st.pos.shape)
            ):
                out[name] = st.unmerge(emb)
            return out

        return forward

    return factory


class SentenceTransformers(Adapter):
    """``sentence_transformers.SentenceTransformer`` whose first module wraps a supported
    encoder: the encoder is patched, and pooling stays exact (see the module docstring)."""

    family = "sentence-transformers"
    description = (
        "sentence_transformers.SentenceTransformer over a supported hf-text encoder "
        "(every pooling mode: mean over merged tokens is weighted by size)"
    )

    def matches(self, model: nn.Module) -> bool:
        return "SentenceTransformer" in class_names(model)

    def target(self, model: nn.Module) -> Target:
        modules = list(model.children())
        first = modules[0] if modules else None
        if first is None or not hasattr(first, "auto_model"):
            kind = type(first).__name__ if first is not None else "nothing"
            raise UnsupportedModelError(
                f"{self.family}: the first module is {kind}, not a sentence_transformers "
                "Transformer wrapping a transformers encoder"
            )
        if any(hasattr(m, "auto_model") for m in modules[1:]):
            raise UnsupportedModelError(
                f"{self.family}: more than one Transformer module (routers, multi-tower models) "
                "is not supported"
            )
        encoder = first.auto_model
        if not isinstance(encoder, nn.Module) or getattr(encoder, ATTR, None) is not None:
            raise UnsupportedModelError(
                f"{self.family}: the encoder is {type(encoder).__name__} (a non-PyTorch backend "
                "or already patched); tokenmerge patches PyTorch encoders"
            )
        why = _refusal(encoder)
        fam = _family_of(encoder)
        if why is not None or fam is None:
            raise UnsupportedModelError(
                f"{self.family}: {why or type(encoder).__name__ + ' is not a supported encoder'}; "
                f"supported: {HFText.description}"
            )
        tok = getattr(first, "tokenizer", None)
        special = {int(i) for i in getattr(tok, "all_special_ids", None) or ()}
        target = _text_target(encoder, fam, special)
        target.family = f"{self.family}/{fam.name}"
        target.extra_patches = [(first, "forward", _unmerge_tokens(first))]
        return target


ADAPTERS.append(SentenceTransformers())
