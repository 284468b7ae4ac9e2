"""The patch engine shared by every encoder adapter.

An adapter describes a model family with a :class:`BlockSpec` (how to call a block's attention
and MLP branches and where its queries and keys appear) and finds the blocks in a model. The
:class:`Patch` then

- replaces each block's ``forward`` by an instance attribute that runs
  ``x + attn(x) -> reduce -> x + mlp(x)`` (the only copied logic; the branches themselves are
  the model's own modules, so every framework feature inside them keeps working);
- adds forward hooks on the key (and, if needed, query) modules to capture them;
- passes the proportional-attention bias as the attention's own float mask, so SDPA stays fused.

:meth:`Patch.remove` deletes the instance attributes and hooks, restoring the exact original
modules. The per-forward state lives in a :class:`contextvars.ContextVar` owned by the patch:
two models, or two threads running one model, never share it.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.budget import resolve
from ..core.flops import CostModel
from ..core.reduction import Reduction
from ..core.state import Signals, TokenState
from ..methods.base import Method, has_work

ATTR = "_tokenmerge_patch"

# Captured q/k of the attention call in progress (set only around that call, per thread).
_CAPTURE: contextvars.ContextVar[dict[str, Tensor] | None] = contextvars.ContextVar(
    "tokenmerge_capture", default=None
)


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
class BlockSpec:
    """How to run one block of a family, given the block module ``m``.

    ``attn(m, x, mask)`` and ``mlp(m, x)`` return the residual branches (norm, sub-layer,
    layer scale, drop path included). ``q(m)``/``k(m)`` are the modules whose outputs are the
    queries/keys; ``layout`` says how those outputs are shaped: ``"bhnd"`` (``[B, H, N, d]``) or
    ``"bnc"`` (``[B, N, H*d]``). ``post_norm``: the two callables return the sub-layer's whole
    output, residual and norm included (post-LN encoders such as BERT: ``LN(x + attn(x))``),
    instead of the residual branch alone; adding the residual outside would not be bit-exact.
    """

    attn: Callable[[nn.Module, Tensor, Tensor | None], Tensor]
    mlp: Callable[[nn.Module, Tensor], Tensor]
    q: Callable[[nn.Module], nn.Module]
    k: Callable[[nn.Module], nn.Module]
    heads: Callable[[nn.Module], int]
    scale: Callable[[nn.Module], float]
    layout: str = "bnc"
    post_norm: bool = False


@dataclass
class Target:
    """What an adapter found in a model: the blocks to patch and how to treat their tokens."""

    family: str
    blocks: list[nn.Module]
    spec: BlockSpec
    cost: CostModel
    n_prefix: int  # leading protected tokens (CLS, registers, distillation)
    prop_attn: bool  # the family's default for proportional attention
    grid: Callable[[int], tuple[int, int] | None] = lambda n: None
    # (object, attribute, factory(patch) -> value): instance attributes to override
    extra_patches: list[tuple[object, str, Callable[[Patch], Any]]] = field(default_factory=list)
    # (module, factory(patch) -> hook): forward pre-hooks with kwargs (e.g. pooling heads)
    pre_hooks: list[tuple[nn.Module, Callable[[Patch], Callable]]] = field(default_factory=list)
    # (module, factory(patch) -> hook): forward hooks with kwargs, run after the module
    post_hooks: list[tuple[nn.Module, Callable[[Patch], Callable]]] = field(default_factory=list)
    # Text models: the module whose forward arguments (input_ids, attention_mask) are recorded
    # for ``init``, and ``init(x, inputs) -> (protected [B, N], size [B, N] or None)`` that
    # replaces the default "the first n_prefix tokens are protected, no padding".
    inputs_from: nn.Module | None = None
    init: Callable[[Tensor, dict[str, Any]], tuple[Tensor, Tensor | None]] | None = None
    # Padded batches (text): after each reduction, drop the padding slots (size 0) so that the
    # batch narrows to its longest remaining sequence instead of keeping every pad position.
    compact_padding: bool = False


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


@dataclass
class _Run:
    """One forward pass: its token state and budget schedule.

    ``schedule[l]`` is an int when every sample has the same length, else a ``[B]`` tensor
    (padded text batches: each sequence gets the schedule of its own length).
    """

    state: TokenState
    schedule: list[int | Tensor]
    reduced: bool = False


class Patch:
    """A method attached to a model's blocks; undone by :meth:`remove`."""

    def __init__(self, model: nn.Module, method: Method, target: Target) -> None:
        self.model = model
        self.method = method
        self.target = target
        self.prop_attn = target.prop_attn if method.prop_attn is None else method.prop_attn
        self._run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
            f"tokenmerge_run_{id(self)}", default=None
        )
        self._inputs: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
            f"tokenmerge_inputs_{id(self)}", default=None
        )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved: list[tuple[object, str, bool, Any]] = []

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        spec = self.target.spec
        need_q = "queries" in self.method.needs
        for i, block in enumerate(self.target.blocks):
            self._override(block, "forward", self._make_forward(block, i))
            self._handles.append(spec.k(block).register_forward_hook(_capture("k")))
            if need_q:
                self._handles.append(spec.q(block).register_forward_hook(_capture("q")))
        for obj, attr, factory in self.target.extra_patches:
            self._override(obj, attr, factory(self))
        if self.target.inputs_from is not None:
            self._handles.append(
                self.target.inputs_from.register_forward_pre_hook(
                    self._record_inputs, with_kwargs=True
                )
            )
        for module, factory in self.target.pre_hooks:
            self._handles.append(module.register_forward_pre_hook(factory(self), with_kwargs=True))
        for module, factory in self.target.post_hooks:
            self._handles.append(module.register_forward_hook(factory(self), with_kwargs=True))
        setattr(self.model, ATTR, self)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, attr, had, old in reversed(self._saved):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._saved.clear()
        if getattr(self.model, ATTR, None) is self:
            delattr(self.model, ATTR)

    def _override(self, obj: object, attr: str, value: Any) -> None:
        had = attr in vars(obj)
        self._saved.append((obj, attr, had, vars(obj).get(attr)))
        setattr(obj, attr, value)

    # ------------------------------------------------------------------ per-forward state
    @property
    def state(self) -> TokenState | None:
        """The token state of the latest forward pass in this thread/context."""
        run = self._run.get()
        return None if run is None else run.state

    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs.set({"args": args, **kwargs})

    def _start(self, x: Tensor) -> _Run:
        b, n, _ = x.shape
        if self.target.init is not None:
            protected, size = self.target.init(x, self._inputs.get() or {})
        else:
            protected = torch.zeros(b, n, dtype=torch.bool, device=x.device)
            protected[:, : min(self.target.n_prefix, n)] = True
            size = None
        p = min(self.target.n_prefix, n)
        state = TokenState.start(
            x,
            protected,
            size=size,
            grid=self.target.grid(n - p),
            n_prefix=p,
            depth=len(self.target.blocks),
        )
        run = _Run(state, self._schedule(state))
        self._run.set(run)
        return run

    def _schedule(self, st: TokenState) -> list[int | Tensor]:
        depth, budget = len(self.target.blocks), self.method.budget
        if budget.is_zero:
            return [0] * depth
        lengths = st.counts.tolist()
        n_prot = (st.protected & st.valid).sum(1).tolist()
        min_tokens = self.method.min_tokens

        def one(n: int, p: int) -> tuple[int, ...]:
            if n < min_tokens:
                return (0,) * depth
            return resolve(budget, n, p, self.target.cost, self.method.max_r)

        rows = {(n, p): one(n, p) for n, p in zip(lengths, n_prot, strict=True)}
        if len(rows) == 1:
            return list(next(iter(rows.values())))
        per = torch.tensor([rows[n, p] for n, p in zip(lengths, n_prot, strict=True)])
        return list(per.T.to(st.pos.device))

    def _make_forward(self, block: nn.Module, i: int) -> Callable[..., Tensor]:
        spec, method = self.target.spec, self.method

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            run = self._start(x) if i == 0 else self._run.get()
            if run is None:
                raise RuntimeError("tokenmerge: a patched block ran before block 0 of its model")
            st = run.state
            if run.reduced:
                mask = st.attn_bias(self.prop_attn, x.dtype)
            else:  # nothing reduced yet: the model's own mask, so budget 0 is bit-identical
                mask = args[0] if args else kwargs.get("attention_mask", kwargs.get("attn_mask"))
            cap: dict[str, Tensor] = {}
            token = _CAPTURE.set(cap)
            try:
                a = spec.attn(block, x, mask)
                h = a if spec.post_norm else x + a
            finally:
                _CAPTURE.reset(token)
            r = run.schedule[i]
            if method.dynamic or has_work(r):
                sig = Signals(
                    x=h,
                    k=_heads(cap["k"], spec.layout, spec.heads(block)),
                    q=_heads(cap["q"], spec.layout, spec.heads(block)) if "q" in cap else None,
                    scale=spec.scale(block),
                    # before the first reduction, still hide padding from explicit attention
                    bias=mask if run.reduced else st.attn_bias(False, h.dtype),
                )
                red = method.reduce(sig, st, r, i)
                if red is not None:
                    h = st.reduce(h, red)
                    if self.target.compact_padding:
                        h = _drop_padding(st, h)
                    run.reduced = True
            m = spec.mlp(block, h)
            out = m if spec.post_norm else h + m
            st.tokens_per_layer.append(st.counts)
            return out

        return forward


def _capture(name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        cap = _CAPTURE.get()
        if cap is not None:
            cap[name] = output

    return hook


def _drop_padding(st: TokenState, h: Tensor) -> Tensor:
    """Remove padding slots (size 0) that make the batch wider than its longest sequence."""
    valid = st.valid
    n = valid.shape[1]
    if int(valid.sum(1).max()) == n:
        return h
    ar = torch.arange(n, device=valid.device).expand_as(valid)
    return st.reduce(h, Reduction.from_targets(torch.where(valid, ar, -1)))


def _heads(t: Tensor, layout: str, heads: int) -> Tensor:
    if layout == "bhnd":
        return t
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def square_grid(n: int) -> tuple[int, int] | None:
    """``(h, w)`` for ``n`` patch tokens on a square grid, else ``None``."""
    s = round(n**0.5)
    return (s, s) if s * s == n else None
