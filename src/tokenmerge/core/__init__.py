"""The reduction core: the sparse token map, per-forward state, budgets and FLOPs."""

from .budget import (
    Budget,
    Constant,
    Inflection,
    KeepRatio,
    PerLayer,
    TargetFlops,
    TargetTokens,
    as_budget,
)
from .flops import CostModel
from .reduction import Reduction
from .state import Signals, TokenState

__all__ = [
    "Budget",
    "Constant",
    "CostModel",
    "Inflection",
    "KeepRatio",
    "PerLayer",
    "Reduction",
    "Signals",
    "TargetFlops",
    "TargetTokens",
    "TokenState",
    "as_budget",
]
