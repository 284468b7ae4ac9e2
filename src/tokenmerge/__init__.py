"""tokenmerge: training-free token merging and pruning for pretrained transformers.

>>> import tokenmerge as tm
>>> tm.apply(model, tm.ToMe(r=16))    # patch in place
>>> tm.remove(model)                  # exact original again
"""

from .adapters import ReductionNotApplied, UnsupportedModelError
from .adapters.hf_decoder import ReducedCache, chunked_prefill
from .api import apply, patch_of, patched, remove, state, summary, supported_families
from .core import (
    Budget,
    Constant,
    CostModel,
    Inflection,
    KeepRatio,
    PerLayer,
    Reduction,
    TargetFlops,
    TargetTokens,
    TokenState,
)
from .methods import REGISTRY, Method, ToMe, get_method
from .tune import Plan, autotune, calibrate

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Budget",
    "Constant",
    "CostModel",
    "Inflection",
    "KeepRatio",
    "Method",
    "PerLayer",
    "Plan",
    "ReducedCache",
    "Reduction",
    "ReductionNotApplied",
    "TargetFlops",
    "TargetTokens",
    "ToMe",
    "TokenState",
    "UnsupportedModelError",
    "apply",
    "autotune",
    "calibrate",
    "chunked_prefill",
    "get_method",
    "patch_of",
    "patched",
    "remove",
    "state",
    "summary",
    "supported_families",
]
