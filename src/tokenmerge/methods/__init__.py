"""Token-reduction methods, one file each; :data:`REGISTRY` lists them by name.

Every registered method class is imported here by name (so that IDEs and type checkers see
``tokenmerge.PiToMe``, ``tokenmerge.SnapKV``, ...), and every other module in this package is
imported too, so a new method file registers itself with ``@register`` even before it is added
below. ``tests/test_exports.py`` fails until it is also exported here and from ``tokenmerge``.
"""

import importlib
import pkgutil

from .atc import ATC
from .base import REGISTRY, Method, get_method, register
from .decoder import AIMPrune, FastV, HoliTomInner
from .dtome import DToMe
from .framefusion import FrameFusion
from .gtp import GTP
from .kv import (
    H2O,
    TOVA,
    AdaKV,
    ExpectedAttention,
    KeyDiff,
    KNorm,
    KVzip,
    RandomKV,
    SnapKV,
    StreamingLLM,
)
from .m3 import M3
from .pitome import PiToMe
from .projector import (
    DART,
    AIMMerge,
    DivPrune,
    DownsampleProj,
    FrameSubsample,
    HoliTom,
    M3Proj,
    ProjectorMethod,
    RandomProj,
    RecoverableCompression,
    TempMe,
    VisionZipProj,
)
from .pruning import EViT, RandomPrune
from .tofu import ToFu
from .token_transforming import TokenTransforming
from .tome import ToMe
from .tomesd import ToMeSD
from .visionzip import VisionZip

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "matching"):
        importlib.import_module(f"{__name__}.{_m.name}")

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
    "KNorm",
    "KVzip",
    "KeyDiff",
    "M3Proj",
    "Method",
    "PiToMe",
    "ProjectorMethod",
    "RandomKV",
    "RandomProj",
    "RandomPrune",
    "RecoverableCompression",
    "SnapKV",
    "StreamingLLM",
    "TempMe",
    "ToFu",
    "ToMe",
    "ToMeSD",
    "TokenTransforming",
    "VisionZip",
    "VisionZipProj",
    "get_method",
    "register",
]
