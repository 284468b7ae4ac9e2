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

Input rules (the same for every method's hyper-parameters, see
:func:`tokenmerge.methods.base.normalise`): any integral type is an int (``np.int64(8)``, a 0-d
integer tensor) and any real type a float (``np.float32(0.5)``, a 0-d tensor); both are
normalised to plain ``int``/``float`` when the object is built, so equality, reprs, hashing and
JSON behave as with plain values. Refused, with the parameter, the value and the accepted forms
in the message: strings (use :func:`parse_budget` for command-line text), bools, NaN and
infinities, negative counts, ratios outside their interval, tuples other than
``(r, inflection)``, and floats for ``r``, ``8.0`` included: ``r=0.5`` is usually meant as a
keep ratio (``KeepRatio(0.5)``) and is not silently read as 0. A per-layer list must have one
value per patched layer; :meth:`Budget.validate` checks this when the model is patched, before
any forward, a list of zeros included.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .flops import CostModel

MaxR = Callable[[int, int], int]  # (tokens, protected) -> most tokens one layer may remove

# --------------------------------------------------------------------------------------------
# Scalars: every integral type is an int, every real type a float, and nothing else is
# --------------------------------------------------------------------------------------------

INT_FORMS = "an int (a Python int, a NumPy integer or a 0-d integer tensor)"
REAL_FORMS = "a number (a Python int or float, a NumPy number or a 0-d tensor)"
BOOL_FORMS = "True or False (a Python or NumPy bool, or a 0-d bool tensor)"
BUDGET_FORMS = (
    "an int r (tokens removed per layer, e.g. 8), ToMe's (r, inflection) such as (8, -1.0), "
    "a per-layer list such as [8, 8, 4], or a budget: tm.KeepRatio(0.9), tm.TargetTokens(64), "
    "tm.TargetFlops(0.5)"
)


def _scalar(value: Any) -> Any:
    """A NumPy scalar, 0-d array or 0-d tensor as its Python scalar; anything else as is."""
    if not isinstance(value, (str, bytes)) and getattr(value, "ndim", None) == 0:
        item = getattr(value, "item", None)
        if callable(item):
            return item()
    return value


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ in ("bool_", "bool")


def show_value(value: Any) -> str:
    """``value`` and its type, for error messages: ``'8' (a str)``."""
    kind = type(value).__name__
    return f"{value!r} ({'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind})"


def as_int(
    value: Any, name: str, *, minimum: int | None = None, none_ok: bool = False, hint: str = ""
) -> int:
    """``value`` as a plain ``int``, or a ``TypeError``/``ValueError`` naming ``name``.

    Accepted: Python and NumPy integers and 0-d integer tensors (or arrays). Refused: bools,
    strings, floats (``8.0`` too: an int parameter given a float is more often a mistake than
    not) and anything else; values below ``minimum``.
    """
    v = _scalar(value)
    if minimum is None:
        what = "an int"
    else:
        what = "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
    forms = INT_FORMS.replace("an int", what, 1) + (" or None" if none_ok else "")
    if _is_bool(v) or not isinstance(v, numbers.Integral):
        extra = ""
        if isinstance(v, numbers.Real) and not _is_bool(v):
            extra = f"; pass {int(v)}" if math.isfinite(v) and float(v).is_integer() else ""
        raise TypeError(f"{name} must be {forms}, got {show_value(value)}{extra}{hint}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be {what}, got {v}{hint}")
    return v


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    a = "-inf" if lo is None else f"{lo:g}"
    b = "inf" if hi is None else f"{hi:g}"
    return f"{'(' if lo_open or lo is None else '['}{a}, {b}{')' if hi_open or hi is None else ']'}"


def as_float(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    finite: bool = True,
    none_ok: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a plain ``float`` in the given interval, or an error naming ``name``.

    Accepted: Python ints and floats, NumPy numbers, 0-d tensors (or arrays). Refused: bools,
    strings, NaN, infinities (unless ``finite=False``) and values outside ``[lo, hi]`` (open
    ends with ``lo_open``/``hi_open``).
    """
    v = _scalar(value)
    ranged = lo is not None or hi is not None
    where = f" in {_interval(lo, hi, lo_open, hi_open)}" if ranged else ""
    forms = REAL_FORMS + (" or None" if none_ok else "")
    if _is_bool(v) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {forms}{where}, got {show_value(value)}{hint}")
    v = float(v)
    if math.isnan(v) or (finite and math.isinf(v)):
        kind = "a finite number" if finite else "a number (not NaN)"
        raise ValueError(f"{name} must be {kind}{where}, got {v}{hint}")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (
        hi is not None and (v > hi or (hi_open and v == hi))
    ):
        raise ValueError(f"{name} must lie in {_interval(lo, hi, lo_open, hi_open)}, got {v}{hint}")
    return v


def as_bool(value: Any, name: str, *, none_ok: bool = False) -> bool:
    """``value`` as a plain ``bool``: Python or NumPy bools and 0-d bool tensors only (``1`` and
    ``"false"`` are refused: they are not what they look like)."""
    v = _scalar(value)
    if not _is_bool(v):
        forms = BOOL_FORMS + (" or None" if none_ok else "")
        raise TypeError(f"{name} must be {forms}, got {show_value(value)}")
    return bool(v)


def _r(value: Any, name: str) -> int:
    """A number of tokens removed per layer: a non-negative int, with a hint for floats."""
    v = _scalar(value)
    hint = f"; accepted budgets: {BUDGET_FORMS}"
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not _is_bool(v):
        if 0.0 < v < 1.0:
            hint = f"; r counts tokens, for a keep ratio use tm.KeepRatio({v:g})" + hint
        elif math.isfinite(v) and not float(v).is_integer():
            hint = "; r counts tokens, for a fraction use tm.KeepRatio or tm.TargetFlops" + hint
    return as_int(value, name, minimum=0, hint=hint)


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


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses: normalise in __post_init__


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
        _set(self, "r", _r(self.r, "r"))

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
        _set(self, "r", _r(self.r, "r"))
        _set(self, "inflection", as_float(self.inflection, "inflection", lo=-1.0, hi=1.0))

    @property
    def is_zero(self) -> bool:
        return self.r == 0

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        lo, hi = self.r * (1 - self.inflection), self.r * (1 + self.inflection)
        step = (hi - lo) / max(cost.depth - 1, 1)
        rs = [int(lo + step * i) for i in range(cost.depth)]
        _check_first(rs[0], n0, n_protected, max_r, "r at layer 0")
        return _clamped(rs, n0, n_protected, max_r)


def _per_layer(values: Any, name: str) -> list[int]:
    if hasattr(values, "ndim") and hasattr(values, "tolist") and values.ndim == 1:
        values = values.tolist()  # a 1-d array or tensor of per-layer values
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{name} must be a list with one int per layer, got {show_value(values)}; "
            f"accepted budgets: {BUDGET_FORMS}"
        )
    return [_r(v, f"{name}[{i}]") for i, v in enumerate(values)]


@dataclass(frozen=True)
class PerLayer(Budget):
    """An explicit number of tokens to remove at each layer; every value must be feasible, and
    there must be exactly one per patched layer (checked when the model is patched, a list of
    zeros included)."""

    rs: tuple[int, ...]

    def __post_init__(self) -> None:
        _set(self, "rs", tuple(_per_layer(self.rs, "r")))

    @property
    def is_zero(self) -> bool:
        return not any(self.rs)

    def validate(self, depth: int) -> None:
        if len(self.rs) != depth:
            raise ValueError(
                f"the per-layer schedule r={list(self.rs)} has {len(self.rs)} values but the "
                f"model has {depth} patched layers; give one value per layer ({depth} values), "
                "or a constant r"
            )

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        self.validate(cost.depth)
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
        hint = " (the fraction of its unprotected tokens each layer keeps, e.g. 0.9)"
        ratio = as_float(self.ratio, "KeepRatio.ratio", lo=0.0, hi=1.0, lo_open=True, hint=hint)
        _set(self, "ratio", ratio)

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
        hint = " (the tokens per sample to reach after the last layer, e.g. 64)"
        _set(self, "tokens", as_int(self.tokens, "TargetTokens.tokens", minimum=1, hint=hint))

    def schedule(self, n0: int, n_protected: int, cost: CostModel, max_r: MaxR) -> list[int]:
        return _best_constant(n0, n_protected, cost, max_r, lambda rs: n0 - sum(rs) - self.tokens)


@dataclass(frozen=True)
class TargetFlops(Budget):
    """The constant r whose analytic FLOPs ratio (see :mod:`.flops`) is closest to ``ratio``."""

    ratio: float

    def __post_init__(self) -> None:
        hint = " (the FLOPs of the reduced model over the full one, e.g. 0.5)"
        ratio = as_float(self.ratio, "TargetFlops.ratio", lo=0.0, hi=1.0, lo_open=True, hint=hint)
        _set(self, "ratio", ratio)

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


def budget_value(value: Any, name: str = "r") -> Budget | int | tuple[int, float] | list[int]:
    """``value`` checked and normalised, in the form it was given: a :class:`Budget` as is, an
    integral r as an ``int``, ``(r, inflection)`` as ``(int, float)``, a per-layer list (or 1-d
    array) as a list of ``int``. Anything else is refused with the accepted forms."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                f"{name}={value!r}: a tuple budget is ToMe's (r, inflection), 2 values, but it "
                f"has {len(value)}; for one value per layer pass a list ({list(value)!r}); "
                f"accepted budgets: {BUDGET_FORMS}"
            )
        return (
            _r(value[0], f"{name}[0] (the r of (r, inflection))"),
            as_float(value[1], "inflection", lo=-1.0, hi=1.0),
        )
    if isinstance(value, list) or (getattr(value, "ndim", None) == 1 and hasattr(value, "tolist")):
        return _per_layer(value, name)
    v = _scalar(value)
    if _is_bool(v):
        raise TypeError(
            f"{name} must be an int, (r, inflection), a list or a Budget, got {show_value(value)}; "
            f"accepted budgets: {BUDGET_FORMS}"
        )
    if isinstance(v, numbers.Real):
        return _r(value, name)
    extra = ""
    if isinstance(value, str):
        extra = (
            f"; to read a command-line budget use tokenmerge.core.budget.parse_budget({value!r})"
        )
    raise TypeError(
        f"unsupported budget {name}={show_value(value)}: accepted budgets: {BUDGET_FORMS}{extra}"
    )


def as_budget(value: BudgetLike) -> Budget:
    """Turn ``16``, ``(16, -1.0)``, ``[..]`` or a :class:`Budget` into a :class:`Budget`
    (integral types of NumPy and torch count as ints; see :func:`budget_value`)."""
    v = budget_value(value)
    if isinstance(v, Budget):
        return v
    if isinstance(v, int):
        return Constant(v)
    if isinstance(v, tuple):
        return Inflection(*v)
    return PerLayer(tuple(v))


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
    except (ValueError, TypeError) as e:
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
