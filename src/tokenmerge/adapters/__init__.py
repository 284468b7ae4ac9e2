"""Model-family adapters; importing this package registers them all in :data:`ADAPTERS`."""

import importlib.util

# (registration; MPNet and ModernBERT register their text families in hf_text)
# (the diffusers adapter knows its models by class name: it needs no diffusers import)
from . import (  # noqa: F401
    diffusers,
    hf_modernbert,
    hf_mpnet,
    hf_text,
    hf_vision,
    sentence_encoders,
    timm_vit,
)

# the decoder adapter builds on transformers' Cache classes at import time; without
# transformers (`pip install tokenmerge[timm]`) there is no decoder to patch
if importlib.util.find_spec("transformers") is not None:
    from . import hf_decoder, hf_vlm, hf_whisper  # noqa: F401  (registration)
from .base import ADAPTERS, Adapter, ReductionNotApplied, UnsupportedModelError
from .patch import Patch

__all__ = ["ADAPTERS", "Adapter", "Patch", "ReductionNotApplied", "UnsupportedModelError"]
