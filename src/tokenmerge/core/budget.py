"""Budgets: how many tokens each layer removes.

A budget resolves, for a given input (``n0`` tokens, ``n_protected`` of them protected), into
a per-layer schedule ``r_l`` of tokens removed at layer ``l``. The method says how many it can
remove at most from ``n`` tokens (``max_r``; ToMe's bipartite matching can merge at most half
of the unprotected tokens per layer).

Every kind accepted by ``ToMe(r=...)`` and the other methods:

=====================  =========================================================
``16``                 :class:`Constant`: 16 per layer (clamped where fewer remain)
``(16, -1.0)``         :class:`Inflection`: ToMe's linear ramp ``r(1-i) -> r(1+i)``
``[8, 8, 16, ...]``    :class:`PerLayer`: explicit, one value per layer (strict)
``KeepRatio(0.9)``     each layer keeps 90% of its unprotected tokens
``TargetTokens(64)``   the constant r whose final token count is closest to 64
``TargetFlops(0.5)``   the constant r whose analytic FLOPs ratio is closest to 0.5
=====================  =========================================================
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .flops import CostModel

MaxR = Callable[[int, int], int]  # (tokens, protected) -> most tokens one layer may remove


class Budget(ABC):
    """A per-layer reduction schedule."""

    @abstractmethod
    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        """Tokens to remove at each of the ``cost.depth`` layers."""

    @property
    def is_zero(self) -> bool:
        """True when this budget never removes anything."""
        return False

    def validate(self, depth: int) -> None:  # noqa: B027 (a no-op unless depth matters)
        """Refuse, before any forward, a budget that cannot fit a model of ``depth`` layers."""


def _clamped(rs: Sequence[float], n0: int, p: int, max_r: MaxR) -> list[int]:
    out, n = [], n0
    for r in rs:
        r = max(0, min(int(r), max_r(n, p)))
        out.append(r)
        n -= r
    return out


def _check_first(r: int, n0: int, p: int, max_r: MaxR, what: str) -> None:
    limit = max_r(n0, p)
    if r > limit:
        raise ValueError(
            f"{what}={r} is too large: the first layer has {n0} tokens ({p} protected) and this "
            f"method can remove at most {limit} of them per layer; choose a value in [0, {limit}]"
        )


@dataclass(frozen=True)
class Constant(Budget):
    """Remove ``r`` tokens at every layer (ToMe's default), clamped where fewer remain."""

    r: int

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ValueError(f"r must be a non-negative integer, got {self.r!r}")

    @property
    def is_zero(self) -> bool:
        return self.r == 0

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        _check_first(self.r, n0, n_protected, max_r, "r")
        return _clamped([self.r] * cost.depth, n0, n_protected, max_r)


@dataclass(frozen=True)
class Inflection(Budget):
    """ToMe's ``(r, inflection)``: r per layer ramps linearly from ``r(1-i)`` to ``r(1+i)``.

    ``inflection=-1`` is the paper's "decreasing" schedule (2r at the first layer, 0 at the last).
    """

    r: int
    inflection: float

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"r must be non-negative, got {self.r}")
        if not -1.0 <= self.inflection <= 1.0:
            raise ValueError(f"inflection must lie in [-1, 1], got {self.inflection}")

    @property
    def is_zero(self) -> bool:
        return self.r == 0

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        lo, hi = self.r * (1 - self.inflection), self.r * (1 + self.inflection)
        step = (hi - lo) / max(cost.depth - 1, 1)
        rs = [int(lo + step * i) for i in range(cost.depth)]
        _check_first(rs[0], n0, n_protected, max_r, "r at layer 0")
        return _clamped(rs, n0, n_protected, max_r)


@dataclass(frozen=True)
class PerLayer(Budget):
    """An explicit number of tokens to remove at each layer; every value must be feasible."""

    rs: tuple[int, ...]

    def __post_init__(self) -> None:
        if any((not isinstance(r, int)) or r < 0 for r in self.rs):
            raise ValueError(f"per-layer r values must be non-negative integers, got {self.rs}")

    @property
    def is_zero(self) -> bool:
        return not any(self.rs)

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        if len(self.rs) != cost.depth:
            raise ValueError(
                f"the per-layer schedule has {len(self.rs)} values but the model has "
                f"{cost.depth} patched layers"
            )
        n = n0
        for i, r in enumerate(self.rs):
            limit = max_r(n, n_protected)
            if r > limit:
                raise ValueError(
                    f"r={r} at layer {i} is too large: {n} tokens remain ({n_protected} "
                    f"protected) and at most {limit} can be removed there"
                )
            n -= r
        return list(self.rs)


@dataclass(frozen=True)
class KeepRatio(Budget):
    """Each layer keeps ``ratio`` of its unprotected tokens (so ``N_L ≈ N_0 ratio^L``)."""

    ratio: float

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {self.ratio}")

    @property
    def is_zero(self) -> bool:
        return self.ratio == 1.0

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        out, n = [], n0
        for _ in range(cost.depth):
            want = round((n - n_protected) * (1.0 - self.ratio))
            r = min(want, max_r(n, n_protected))
            out.append(r)
            n -= r
        return out


def _best_constant(
    n0: int, p: int, cost: CostModel, max_r: MaxR, score: Callable[[list[int]], float]
) -> list[int]:
    best, best_err = [0] * cost.depth, math.inf
    for r in range(max_r(n0, p) + 1):
        rs = _clamped([r] * cost.depth, n0, p, max_r)
        err = abs(score(rs))
        if err < best_err:
            best, best_err = rs, err
    return best


@dataclass(frozen=True)
class TargetTokens(Budget):
    """The constant r whose token count after the last layer is closest to ``tokens``."""

    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"target token count must be >= 1, got {self.tokens}")

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        return _best_constant(n0, n_protected, cost, max_r, lambda rs: n0 - sum(rs) - self.tokens)


@dataclass(frozen=True)
class TargetFlops(Budget):
    """The constant r whose analytic FLOPs ratio (see :mod:`.flops`) is closest to ``ratio``."""

    ratio: float

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"target FLOPs ratio must lie in (0, 1], got {self.ratio}")

    @property
    def is_zero(self) -> bool:
        return self.ratio == 1.0

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        return _best_constant(
            n0,
            n_protected,
            cost,
            max_r,
            lambda rs: cost.ratio(n0, cost.tokens(n0, rs)) - self.ratio,
        )


BudgetLike = Budget | int | tuple | list


def as_budget(value: BudgetLike) -> Budget:
    """Turn ``16``, ``(16, -1.0)``, ``[..]`` or a :class:`Budget` into a :class:`Budget`."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise TypeError(f"r must be an int, (r, inflection), a list or a Budget, got {value!r}")
    if isinstance(value, int):
        return Constant(value)
    if isinstance(value, tuple) and len(value) == 2:
        return Inflection(int(value[0]), float(value[1]))
    if isinstance(value, list):
        return PerLayer(tuple(value))
    raise TypeError(
        f"unsupported budget {value!r}: use an int r, (r, inflection), a per-layer list, "
        "KeepRatio, TargetTokens or TargetFlops"
    )


def parse_budget(text: str) -> Budget:
    """Parse a budget from the command line.

    Accepted: ``16`` (constant r), ``16:-1`` (r with inflection), ``8,8,16,...`` is not
    accepted here (commas separate budgets on the CLI); use ``list:8/8/16`` for per-layer
    values; ``keep:0.9``, ``tokens:64``, ``flops:0.5``.
    """
    kinds = {"keep": KeepRatio, "tokens": TargetTokens, "flops": TargetFlops}
    t = text.strip()
    try:
        if ":" not in t:
            return Constant(int(t))
        kind, val = t.split(":", 1)
        if kind in kinds:
            return kinds[kind](float(val) if kind != "tokens" else int(val))
        if kind == "list":
            return PerLayer(tuple(int(v) for v in val.split("/")))
        return Inflection(int(kind), float(val))
    except ValueError as e:
        raise ValueError(
            f"cannot parse budget {text!r} ({e}); accepted forms: 16, 16:-1, list:8/8/16, "
            "keep:0.9, tokens:64, flops:0.5"
        ) from None


def budget_label(b: Budget) -> str:
    """Short label for reports (the inverse of :func:`parse_budget`)."""
    if isinstance(b, Constant):
        return f"r={b.r}"
    if isinstance(b, Inflection):
        return f"r={b.r},{b.inflection:+g}"
    if isinstance(b, PerLayer):
        return "r=" + "/".join(map(str, b.rs))
    if isinstance(b, KeepRatio):
        return f"keep={b.ratio:g}"
    if isinstance(b, TargetTokens):
        return f"tokens={b.tokens}"
    if isinstance(b, TargetFlops):
        return f"flops={b.ratio:g}"
    return repr(b)


@lru_cache(maxsize=256)
def resolve(budget: Budget, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> tuple:
    """Cached :meth:`Budget.schedule` (a pure function of its arguments)."""
    return tuple(budget.schedule(n0, n_protected, cost, max_r))
