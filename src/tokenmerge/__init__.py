"""tokenmerge: training-free token merging and pruning for pretrained transformers.

>>> import tokenmerge as tm
>>> tm.apply(model, tm.ToMe(r=16))    # patch in place
>>> tm.remove(model)                  # exact original again
"""

from typing import TYPE_CHECKING

from . import zoo
from .adapters import ReductionNotApplied, UnsupportedModelError
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
from .methods import (
    ATC,
    DART,
    GTP,
    H2O,
    M3,
    REGISTRY,
    TOVA,
    AdaKV,
    AIMMerge,
    AIMPrune,
    DivPrune,
    DownsampleProj,
    DToMe,
    EViT,
    ExpectedAttention,
    FastV,
    FrameFusion,
    FrameSubsample,
    HoliTom,
    HoliTomInner,
    KeyDiff,
    KNorm,
    KVzip,
    M3Proj,
    Method,
    PiToMe,
    ProjectorMethod,
    RandomKV,
    RandomProj,
    RandomPrune,
    RecoverableCompression,
    SnapKV,
    StreamingLLM,
    TempMe,
    ToFu,
    TokenTransforming,
    ToMe,
    ToMeSD,
    VisionZip,
    VisionZipProj,
    get_method,
)
from .tune import Plan, autotune, calibrate

if TYPE_CHECKING:
    from .adapters.hf_decoder import ReducedCache, chunked_prefill

__version__ = "0.1.0"


_LAZY = ("ReducedCache", "chunked_prefill")


def __getattr__(name: str):
    # the decoder-LLM helpers need transformers: imported on first use, so that
    # ``import tokenmerge`` works with only the [timm] extra installed
    if name in _LAZY:
        from .adapters import hf_decoder

        return getattr(hf_decoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ATC",
    "DART",
    "GTP",
    "H2O",
    "M3",
    "REGISTRY",
    "TOVA",
    "AIMMerge",
    "AIMPrune",
    "AdaKV",
    "Budget",
    "Constant",
    "CostModel",
    "DToMe",
    "DivPrune",
    "DownsampleProj",
    "EViT",
    "ExpectedAttention",
    "FastV",
    "FrameFusion",
    "FrameSubsample",
    "HoliTom",
    "HoliTomInner",
    "Inflection",
    "KNorm",
    "KVzip",
    "KeepRatio",
    "KeyDiff",
    "M3Proj",
    "Method",
    "PerLayer",
    "PiToMe",
    "Plan",
    "ProjectorMethod",
    "RandomKV",
    "RandomProj",
    "RandomPrune",
    "RecoverableCompression",
    "ReducedCache",
    "Reduction",
    "ReductionNotApplied",
    "SnapKV",
    "StreamingLLM",
    "TargetFlops",
    "TargetTokens",
    "TempMe",
    "ToFu",
    "ToMe",
    "ToMeSD",
    "TokenState",
    "TokenTransforming",
    "UnsupportedModelError",
    "VisionZip",
    "VisionZipProj",
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
    "zoo",
]
