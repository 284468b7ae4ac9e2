"""Projector-site methods: the visual tokens of a VLM reduced once, before the LLM.

See :mod:`.base` for what a method sees (:class:`VisualTokens`), its budget and the positions
rule. Every module of this package is imported here, so each method registers itself.
"""

import importlib
import pkgutil

from .aim_merge import AIMMerge
from .base import PROJECTOR_NEEDS, ProjectorMethod, VisualTokens, keep_targets, top_k
from .dart import DART
from .divprune import DivPrune
from .downsample_proj import DownsampleProj
from .frame_subsample import FrameSubsample
from .holitom import HoliTom
from .m3_proj import M3Proj
from .random_proj import RandomProj
from .recoverable import RecoverableCompression
from .tempme import TempMe
from .visionzip_proj import VisionZipProj

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

#: the projector methods' registry names, in benchmark order: the baselines (random, plain
#: downsampling, M3's pooling), then the query-agnostic methods (pruning by duplication and
#: diversity, merging, saliency plus merging), then the query-aware one
PROJECTOR_METHODS = (
    "random_proj",
    "downsample_proj",
    "m3_proj",
    "dart",
    "divprune",
    "aim_merge",
    "visionzip_proj",
    "recoverable",
)
#: the methods made for video clips, kept out of the image benchmark: frame subsampling (video
#: only, ``video_only``), TempMe's and HoliTom's temporal merging (on an image they reduce to
#: their per-frame stage)
VIDEO_METHODS = ("frame_subsample", "tempme", "holitom")

__all__ = [
    "DART",
    "PROJECTOR_METHODS",
    "PROJECTOR_NEEDS",
    "VIDEO_METHODS",
    "AIMMerge",
    "DivPrune",
    "DownsampleProj",
    "FrameSubsample",
    "HoliTom",
    "M3Proj",
    "ProjectorMethod",
    "RandomProj",
    "RecoverableCompression",
    "TempMe",
    "VisionZipProj",
    "VisualTokens",
    "keep_targets",
    "top_k",
]
