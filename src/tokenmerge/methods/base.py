"""The method interface and the registry of methods by name.

A method is a dataclass whose fields are its hyper-parameters (defaulting to its paper's
values) plus ``r``, its budget (see :mod:`tokenmerge.core.budget`). It turns what one layer
exposes (:class:`~tokenmerge.core.state.Signals`) and the token state into a
:class:`~tokenmerge.core.reduction.Reduction`. It declares what it needs, so that the adapter
captures queries or computes attention probabilities only when asked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..core.budget import Budget, BudgetLike, as_budget
from ..core.reduction import Reduction
from ..core.state import Signals, TokenState

#: What a method may ask for: "keys" (always captured), "queries" (CLS or full attention).
NEEDS = frozenset({"keys", "queries"})

#: Where a reduction acts (DESIGN.md, "Sites"): "block" = inside an encoder block between
#: attention and MLP; "decoder" = LLM hidden states at layer K; "kv" = the KV cache;
#: "projector" = encoder output before an LLM.
SITES = frozenset({"block", "decoder", "kv", "projector"})

REGISTRY: dict[str, type[Method]] = {}


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
            gets the schedule of its own length.
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
        as_budget(self.r)  # fail early on a malformed budget
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

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
