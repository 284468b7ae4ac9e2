"""The method interface and the registry of methods by name.

A method is a dataclass whose fields are its hyper-parameters (defaulting to its paper's
values) plus ``r``, its budget (see :mod:`tokenmerge.core.budget`). It turns what one layer
exposes (:class:`~tokenmerge.core.state.Signals`) and the token state into a
:class:`~tokenmerge.core.reduction.Reduction`. It declares what it needs, so that the adapter
captures queries or computes attention probabilities only when asked.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from ..core.budget import (
    Budget,
    BudgetLike,
    as_bool,
    as_budget,
    as_float,
    as_int,
    budget_value,
    show_value,
)
from ..core.reduction import Reduction
from ..core.state import Signals, TokenState

#: What a method may ask for: "keys" (always captured), "queries" (CLS or full attention).
NEEDS = frozenset({"keys", "queries"})

#: Where a reduction acts (DESIGN.md, "Sites"): "block" = inside an encoder block between
#: attention and MLP; "decoder" = LLM hidden states at layer K; "kv" = the KV cache;
#: "projector" = encoder output before an LLM; "unmerge" = tokens merged for one sub-layer of a
#: diffusion model's transformer block and copied back after it (tomesd).
SITES = frozenset({"block", "decoder", "kv", "projector", "unmerge"})

REGISTRY: dict[str, type[Method]] = {}

_UNIONS = (typing.Union, types.UnionType)


@functools.cache
def _field_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    """``(name, resolved annotation)`` of every init field of a method dataclass."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def normalise(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against the annotation ``hint`` and normalised to plain Python types.

    ``int``, ``float`` and ``bool`` accept the NumPy and 0-d tensor forms of those types and
    refuse the others (a bool is not an int, a float is not an int, a string is not a
    number, NaN and infinities are not floats); ``Literal[...]`` accepts only its values;
    ``X | None`` also ``None``; ``tuple[...]`` a tuple or list of the right length, element by
    element; ``BudgetLike`` goes through :func:`~tokenmerge.core.budget.budget_value`. Other
    annotations (several types, tensors, ...) are left to the method. Errors name ``name``,
    the value and the accepted forms.
    """
    if hint == BudgetLike:
        return budget_value(value, name.rpartition(".")[2])
    if hint is int:
        return as_int(value, name)
    if hint is float:
        return as_float(value, name)
    if hint is bool:
        return as_bool(value, name)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {show_value(value)}")
        return str(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args) and not (
            isinstance(value, str) and value in args
        ):
            raise ValueError(f"{name} must be one of {args}, got {show_value(value)}")
        return str(value) if isinstance(value, str) else value
    if origin in _UNIONS:
        rest = [a for a in args if a is not type(None)]
        if value is None and len(rest) < len(args):
            return None
        if len(rest) == 1:
            if rest[0] is int:
                return as_int(value, name, none_ok=True)
            if rest[0] is float:
                return as_float(value, name, none_ok=True)
            if rest[0] is bool:
                return as_bool(value, name, none_ok=True)
            return normalise(value, rest[0], name)
        return value  # several types: the method checks them itself
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise TypeError(
                f"{name} must be a tuple (or list) of {_describe(args)}, got {show_value(value)}"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(normalise(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(
                f"{name} must be a tuple of {len(args)} values ({_describe(args)}), got "
                f"{value!r} ({len(value)} values)"
            )
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(normalise(v, a, f"{name}[{i}]") for i, (v, a) in pairs)
    return value


def _describe(args: tuple) -> str:
    if len(args) == 2 and args[1] is Ellipsis:
        return f"{_name(args[0])}, ..."
    return ", ".join(_name(a) for a in args)


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in _UNIONS:
        return " or ".join(_name(a) for a in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to :data:`REGISTRY` under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    if cls.site not in SITES:
        raise ValueError(f"{cls.__name__}.site must be one of {sorted(SITES)}")
    if not cls.needs <= NEEDS:
        raise ValueError(f"{cls.__name__}.needs has unknown entries {set(cls.needs - NEEDS)}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Method(ABC):
    """Base class of every token-reduction method.

    Attributes:
        r: the budget: an int (tokens removed per layer), ``(r, inflection)``, a per-layer
            list, or a :class:`~tokenmerge.core.budget.Budget`. In a padded batch each sample
            gets the schedule of its own length. A float is refused (``KeepRatio`` is the
            fraction form).

    Every field is checked against its annotation when the method is built and normalised
    to plain Python values (:func:`normalise`: NumPy and 0-d tensor numbers become ``int`` /
    ``float``; strings, bools, NaN and floats for ints are refused by name). Subclasses keep
    their own range checks after ``super().__post_init__()``; annotate string choices with
    ``Literal[...]`` and they are checked too.
        prop_attn: proportional attention (``+log size`` on the attention logits). ``None``
            takes the adapter's default for the model family.
        min_tokens: samples with fewer real tokens than this are left unreduced (short
            sentences gain nothing from merging).
    """

    name: ClassVar[str]
    site: ClassVar[str] = "block"
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    #: True for methods whose token count is data-dependent (thresholds): ``reduce`` is then
    #: called at every layer, whatever the schedule says.
    dynamic: ClassVar[bool] = False
    #: True when ``reduce(r=...)`` removes exactly ``r`` tokens of every sample: the patch then
    #: checks the counts reached against the schedule (False where ``r`` means something else,
    #: such as M3's pooling side).
    exact_counts: ClassVar[bool] = True

    r: BudgetLike = 0
    prop_attn: bool | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        # every hyper-parameter checked against its annotation and normalised to plain Python
        # types (np.int64(8) -> 8), so equality, reprs and JSON behave as with the plain values
        owner = type(self).__name__
        for name, hint in _field_hints(type(self)):
            setattr(self, name, normalise(getattr(self, name), hint, f"{owner}.{name}"))
        as_budget(self.r)  # fail early on a malformed budget
        if self.min_tokens < 0:
            raise ValueError(f"{owner}.min_tokens must be >= 0, got {self.min_tokens}")

    @classmethod
    def example(cls, r: int) -> Method:
        """An instance for the test matrix at budget ``r`` (methods needing calibration or
        extra inputs override this)."""
        return cls(r=r)

    @property
    def budget(self) -> Budget:
        return as_budget(self.r)

    def max_r(self, n: int, n_protected: int) -> int:
        """Most tokens one layer can remove from ``n`` tokens, ``n_protected`` of them protected."""
        return max(n - n_protected - 1, 0)

    @abstractmethod
    def reduce(
        self, sig: Signals, state: TokenState, r: int | Tensor, layer: int
    ) -> Reduction | None:
        """The reduction to apply after layer ``layer``'s attention, or ``None`` for none.

        ``r`` is the number of tokens to remove: an int, or a ``[B]`` tensor when samples in a
        padded batch have different lengths.
        """


def static_kept(state: TokenState, r: int | Tensor) -> int | None:
    """Tokens every sample keeps after removing ``r``, when that is known without reading the
    data (an int budget on unpadded tokens), else ``None``: pass it as
    ``Reduction.from_targets(kept=...)`` so that ``torch.compile`` graphs stay whole."""
    return state.pos.shape[1] - r if isinstance(r, int) and state.uniform else None


def has_work(r: int | Tensor) -> bool:
    """Whether a (possibly per-sample) budget removes anything."""
    return bool((r > 0).any()) if isinstance(r, Tensor) else r > 0


def get_method(name: str, **params) -> Method:
    """Instantiate a registered method by name; unknown names list the registered ones."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}"
        ) from None
    return cls(**params)
