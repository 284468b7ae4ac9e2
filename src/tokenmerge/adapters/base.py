"""What every adapter declares: the families' :class:`BlockSpec` and :class:`Target`, the
:class:`Adapter` registry, the errors (:class:`UnsupportedModelError`,
:class:`ReductionNotApplied`) and the per-forward :class:`ContextSlot`.

The engine that acts on a target is :class:`tokenmerge.adapters.patch.Patch`.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.flops import CostModel
from ..methods.base import Method

if TYPE_CHECKING:
    from .patch import Patch

ATTR = "_tokenmerge_patch"
#: set on every module a patch changes: the patch that owns it
CLAIM = "_tokenmerge_claim"


class ContextSlot:
    """Per-forward storage: a :class:`contextvars.ContextVar` (two threads, or two models, never
    share it), and a plain attribute while ``torch.compile`` traces (Dynamo cannot trace a
    ContextVar's mutation; compiled graphs of one model run one at a time).

    Eager writes go to both, so traced code sees them; a traced write is moved into the
    ContextVar by the next eager read, so ``tm.state(model)`` works after a compiled forward.
    """

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[Any] = contextvars.ContextVar(name, default=None)
        self._traced: Any = None
        self._fresh = False

    def get(self) -> Any:
        if torch.compiler.is_compiling():
            return self._traced
        if self._fresh:
            self._fresh = False
            self._var.set(self._traced)
        return self._var.get()

    def clear(self) -> None:
        """Drop the stored value: a context keeps a ContextVar's value (here, a whole forward's
        state and its cache) for as long as the context lives, after the patch is gone."""
        self.set(None)

    def set(self, value: Any) -> None:
        self._traced = value
        if torch.compiler.is_compiling():
            self._fresh = True
        else:
            self._fresh = False
            self._var.set(value)


class UnsupportedModelError(TypeError):
    """Raised for a model (or a block inside it) that no adapter recognises."""


class ReductionNotApplied(RuntimeError):
    """A method with a non-zero budget ran, but the reduction it scheduled did not happen.

    Raised by every site's run-time self-check (a hook that never ran, a cache that was not
    reduced, token counts that differ from the schedule), so that a framework change that
    bypasses tokenmerge never returns unreduced results silently.
    """


def framework_versions() -> str:
    """``"torch 2.x, transformers 5.y, timm 1.z, ..."`` for the frameworks installed."""
    from importlib import metadata

    out = []
    for dist in ("torch", "transformers", "timm", "sentence-transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(out)


def not_applied(site: str, method: Method, what: str) -> ReductionNotApplied:
    """The error of a failed self-check: names the site, the method and the versions."""
    return ReductionNotApplied(
        f"tokenmerge: {type(method).__name__} ({method.name!r}) at the {site!r} site scheduled "
        f"a reduction that did not happen: {what}. Installed: {framework_versions()}. The "
        "model ran unreduced; this framework version is not handled by tokenmerge here "
        "(please report it), so the result was not returned"
    )


@dataclass(frozen=True)
class BlockCall:
    """How the model called a position-aware block (:attr:`BlockSpec.positions`).

    ``args``/``kwargs`` are the block's own call after the hidden states, as the model made it:
    the position terms in it (a relative position bias, rotary tables, a local-window mask)
    are built for the original tokens. ``pos`` (``[B, N]`` long) is the original index of each
    current token (its representative's), or ``None`` until the first reduction: the tokens
    are then the model's own, in order, and the call is to be used as it is.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    pos: Tensor | None


@dataclass(frozen=True)
class BlockSpec:
    """How to run one block of a family, given the block module ``m``.

    ``attn(m, x, mask)`` and ``mlp(m, x)`` return the residual branches (norm, sub-layer,
    layer scale, drop path included). ``q(m)``/``k(m)`` are the modules whose outputs are the
    queries/keys; ``layout`` says how those outputs are shaped: ``"bhnd"`` (``[B, H, N, d]``),
    ``"bnc"`` (``[B, N, H*d]``) or ``"qkv"`` (one fused projection ``[B, N, 3*H*d]``, ordered
    q, k, v; ``q`` and ``k`` then name the same module). ``post_norm``: the two callables
    return the sub-layer's whole output, residual and norm included (post-LN encoders such as
    BERT: ``LN(x + attn(x))``), instead of the residual branch alone; adding the residual
    outside would not be bit-exact. ``returns_tuple``: the block returns ``(hidden_states,)``
    (MPNet's layers), not the tensor itself.

    ``positions``: the block's attention depends on where its tokens are (relative position
    bias, rotary embeddings, local windows), so the engine calls ``attn(m, x, mask, call)``
    with a :class:`BlockCall`. The model has already computed its position terms for the
    original tokens and hands them to every block; the branch evaluates them at the current
    tokens' original positions (``call.pos``), e.g. by gathering rows and columns. That is
    exact by construction (the model's own values, custom ``position_ids`` included), needs
    no copy of the model's position code, and leaves the call untouched until the first
    reduction, so a zero budget stays bit-identical.
    """

    attn: Callable[..., Tensor]
    mlp: Callable[[nn.Module, Tensor], Tensor]
    q: Callable[[nn.Module], nn.Module]
    k: Callable[[nn.Module], nn.Module]
    heads: Callable[[nn.Module], int]
    scale: Callable[[nn.Module], float]
    layout: str = "bnc"
    post_norm: bool = False
    returns_tuple: bool = False
    positions: bool = False


@dataclass
class Target:
    """What an adapter found in a model: the blocks to patch and how to treat their tokens."""

    family: str
    blocks: list[nn.Module]
    spec: BlockSpec
    cost: CostModel
    n_prefix: int  # leading protected tokens (CLS, registers, distillation)
    prop_attn: bool  # the family's default for proportional attention
    # The patch embedding (a conv) whose output ``[B, C, h, w]`` gives each forward's patch grid;
    # the grid is read at run time (non-square and dynamic-size inputs), never guessed.
    grid_from: nn.Module | None = None
    # The module whose forward must run every patched block (default: the patched model); its
    # hooks start each call and check afterwards that the blocks really ran.
    entry: nn.Module | None = None
    # Per-token outputs (backbones, masked-image heads, mean-pooling heads): every block hands
    # the full token grid on, so whatever the model reshapes or averages has the original layout.
    dense: bool = False
    # (object, attribute, factory(patch) -> value): instance attributes to override
    extra_patches: list[tuple[object, str, Callable[[Patch], Any]]] = field(default_factory=list)
    # (module, factory(patch) -> hook): forward pre-hooks with kwargs (e.g. pooling heads)
    pre_hooks: list[tuple[nn.Module, Callable[[Patch], Callable]]] = field(default_factory=list)
    # (module, factory(patch) -> hook): forward hooks with kwargs, run after the module
    post_hooks: list[tuple[nn.Module, Callable[[Patch], Callable]]] = field(default_factory=list)
    # Text models: ``init(x) -> (protected [B, N], size [B, N] or None)`` replaces the default
    # "the first n_prefix tokens are protected, no padding".
    init: Callable[[Tensor], tuple[Tensor, Tensor | None]] | None = None
    # Padded batches (text): after each reduction, drop the padding slots (size 0) so that the
    # batch narrows to its longest remaining sequence instead of keeping every pad position.
    compact_padding: bool = False

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """Every module this target changes (blocks, hooked and overridden modules), once."""
        found = [model, *self.blocks, self.grid_from, self.entry]
        found += [m for m, _ in self.pre_hooks + self.post_hooks]
        found += [o for o, _, _ in self.extra_patches]
        out: dict[int, nn.Module] = {}
        for m in found:
            if isinstance(m, nn.Module):
                out.setdefault(id(m), m)
        return list(out.values())


class Adapter(ABC):
    """A model family. Subclasses are registered in :data:`ADAPTERS`."""

    family: str
    description: str
    sites: frozenset[str] = frozenset({"block"})

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter is responsible for ``model`` (checked by class name)."""

    @abstractmethod
    def target(self, model: nn.Module) -> Target:
        """The blocks of ``model``; raises :class:`UnsupportedModelError` on a block it does not
        recognise exactly (never patch half a model)."""

    def target_for(self, model: nn.Module, method: Method) -> Target:
        """The target that ``method`` patches (adapters whose hooks depend on the method's
        site override this; the default is :meth:`target`)."""
        return self.target(model)


ADAPTERS: list[Adapter] = []


def class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def check_blocks(blocks: list[nn.Module], expected: str, family: str) -> None:
    """Refuse, by name, any block whose class is not exactly the one the spec was written for."""
    for i, b in enumerate(blocks):
        if type(b).__name__ != expected:
            raise UnsupportedModelError(
                f"{family}: block {i} is a {type(b).__name__}, not a {expected}; tokenmerge only "
                f"patches blocks whose structure it knows and will not patch this model half-way"
            )
