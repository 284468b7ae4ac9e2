"""Model-family adapters; importing this package registers them all in :data:`ADAPTERS`."""

from . import hf_decoder, hf_text, hf_vision, timm_vit  # noqa: F401  (registration)
from .base import ADAPTERS, Adapter, ReductionNotApplied, UnsupportedModelError
from .patch import Patch

__all__ = ["ADAPTERS", "Adapter", "Patch", "ReductionNotApplied", "UnsupportedModelError"]
