"""The patch engine shared by every encoder adapter.

An adapter describes a model family with a :class:`~.base.BlockSpec` (how to call a block's
attention and MLP branches and where its queries and keys appear) and finds the blocks in a
model. The :class:`Patch` then

- replaces each block's ``forward`` by an instance attribute that runs
  ``x + attn(x) -> reduce -> x + mlp(x)`` (the only copied logic; the branches themselves are
  the model's own modules, so every framework feature inside them keeps working);
- adds forward hooks on the key (and, if needed, query) modules to capture them;
- passes the proportional-attention bias as the attention's own float mask, so SDPA stays fused;
- hands position-aware attention (``BlockSpec.positions``: relative bias, rotary, local
  windows) the block's own call and the current tokens' original positions;
- checks after every call that the blocks ran and reached the scheduled token counts.

:meth:`Patch.remove` deletes the instance attributes and hooks, restoring the exact original
modules. The per-forward state lives in :class:`~.base.ContextSlot` s owned by the patch: two
models, or two threads running one model, never share it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.budget import Budget
from ..core.state import Signals, TokenState
from ..methods.base import Method, has_work
from .base import ATTR, CLAIM, BlockCall, ContextSlot, Target, not_applied
from .block_tokens import (
    callers_mask,
    capture,
    drop_padding,
    empty_reduction,
    from_grid,
    mlp_on_real_tokens,
    refuse_custom_mask,
    split_heads,
    to_grid,
)
from .resize import check_input_scale, resize_hook


@dataclass
class _Call:
    """One call of the entry module (or of a wrapped method such as ``forward_intermediates``)."""

    dense: bool


@dataclass
class _Run:
    """One forward pass: its token state and budget schedule.

    ``schedule[l]`` is an int when every sample has the same length, else a ``[B]`` tensor
    (padded text batches: each sequence gets the schedule of its own length).
    """

    state: TokenState
    schedule: list[int | Tensor]
    call: _Call | None = None  # the entry call this forward belongs to
    dense: bool = False  # blocks hand the full token grid on (see ``Target.dense``)
    reduced: bool = False
    ran: int = 0  # blocks run so far (they run in order, once each)
    widths: list[int] = field(default_factory=list)  # token dimension after each block


class Patch:
    """A method attached to a model's blocks; undone by :meth:`remove`.

    Besides the blocks, a patch marks every module it changes (``CLAIM``), so that a parent or
    a child of a patched module is refused instead of being patched twice, and overrides the
    model's ``__deepcopy__`` (a deep copy is an independent patched copy) and every changed
    module's ``__reduce_ex__`` (pickling says to call :func:`tokenmerge.remove` first: hooks
    and per-forward state do not pickle).
    """

    def __init__(
        self, model: nn.Module, method: Method, target: Target, input_scale: float | None = None
    ) -> None:
        self.model = model
        self.method = method
        self.target = target
        #: each image side's fraction, resized on entry (:mod:`.resize`); ``None``: as given
        self.input_scale = (
            None if input_scale is None else check_input_scale(model, target, input_scale)
        )
        self.prop_attn = target.prop_attn if method.prop_attn is None else method.prop_attn
        self._run = ContextSlot(f"tokenmerge_run_{id(self)}")  # the current forward (_Run)
        self._call = ContextSlot(f"tokenmerge_call_{id(self)}")  # the entry call in progress
        self._grid = ContextSlot(f"tokenmerge_grid_{id(self)}")  # (h, w) from the patch embedding
        self._cap = ContextSlot(f"tokenmerge_cap_{id(self)}")  # q/k captured in the attention call
        self._resized = ContextSlot(f"tokenmerge_resized_{id(self)}")  # input_scale hook ran
        #: per-forward state cleared by :meth:`release` (attachments add their own)
        self.slots: list[ContextSlot] = [
            self._run,
            self._call,
            self._grid,
            self._cap,
            self._resized,
        ]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved: list[tuple[object, str, bool, Any]] = []
        self._attachments: tuple[list, list] | None = None
        self._schedules: dict[tuple[int, int], tuple[int, ...]] = {}  # (n, p) -> schedule
        self._schedules_for: Budget | None = None  # the budget they were solved for

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        if self.target.blocks:
            self.method.budget.validate(len(self.target.blocks))
        changed = self.target.modules(self.model)
        for m in changed:
            owner = vars(m).get(CLAIM)
            if owner is not None:
                raise ValueError(
                    f"cannot patch {type(self.model).__name__}: its {type(m).__name__} is "
                    f"already patched by tokenmerge as part of {type(owner.model).__name__} "
                    f"({owner.method.name}); call tokenmerge.remove on that model first"
                )
        if self._attachments is None:
            self._attachments = self._build(changed)
        overrides, hooks = self._attachments
        for obj, attr, value in overrides:
            self._override(obj, attr, value)
        for module, kind, hook in hooks:
            if kind == "pre":
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:  # "post" hooks read the output; "post_kw" ones the call's kwargs too
                handle = module.register_forward_hook(hook, with_kwargs=kind == "post_kw")
            self._handles.append(handle)

    def _build(self, changed: list[nn.Module]) -> tuple[list, list]:
        """The instance attributes and hooks :meth:`install` attaches, built once: a re-install
        (around a deep copy) attaches the very same objects again."""
        t, spec = self.target, self.target.spec
        overrides: list[tuple[object, str, Any]] = []
        hooks: list[tuple[nn.Module, str, Callable]] = []
        if self.input_scale is not None:  # first: every later hook sees the resized input
            done = lambda: self._resized.set(True)  # noqa: E731
            hooks.append((self.model, "pre", resize_hook(self.model, t, self.input_scale, done)))
        for i, block in enumerate(t.blocks):
            overrides.append((block, "forward", self._make_forward(block, i)))
            hooks.append((spec.k(block), "post", capture(self._cap, "k")))
            if "queries" in self.method.needs:
                hooks.append((spec.q(block), "post", capture(self._cap, "q")))
        overrides += [(obj, attr, factory(self)) for obj, attr, factory in t.extra_patches]
        if t.grid_from is not None:
            hooks.append((t.grid_from, "post", self._record_grid))
        if t.blocks:
            entry = t.entry or self.model
            hooks += [(entry, "pre", self._enter), (entry, "post_kw", self._leave)]
        hooks += [(m, "pre", factory(self)) for m, factory in t.pre_hooks]
        hooks += [(m, "post_kw", factory(self)) for m, factory in t.post_hooks]
        for m in changed:
            overrides += [(m, CLAIM, self), (m, "__reduce_ex__", _refuse_pickle(self, m))]
        overrides += [(self.model, "__deepcopy__", self._deepcopy), (self.model, ATTR, self)]
        return overrides, hooks

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

    def release(self) -> None:
        """:meth:`remove` for good (``tm.remove``): also drop the per-forward state this
        context holds, which would otherwise keep the last forward's tensors (a decoder's whole
        KV cache) alive for every patch ever applied in it."""
        self.remove()
        for slot in self.slots:
            slot.clear()

    def _override(self, obj: object, attr: str, value: Any) -> None:
        had = attr in vars(obj)
        self._saved.append((obj, attr, had, vars(obj).get(attr)))
        setattr(obj, attr, value)

    def _deepcopy(self, memo: dict[int, Any]) -> nn.Module:
        """``copy.deepcopy(model)``: an unpatched deep copy, patched with a copy of the method.

        The original is un-patched for the duration of the copy (do not run it from another
        thread meanwhile) and re-patched exactly as before.
        """
        from ..api import apply  # the public entry point re-derives the target for the copy

        self.remove()
        try:
            clone = copy.deepcopy(self.model, memo)
        finally:
            self.install()
        return apply(clone, copy.deepcopy(self.method, memo), input_scale=self.input_scale)

    # ------------------------------------------------------------------ per-forward state
    @property
    def state(self) -> TokenState | None:
        """The token state of the latest forward pass in this thread/context."""
        run = self._run.get()
        return None if run is None else run.state

    @contextlib.contextmanager
    def dense_call(self) -> Iterator[_Call]:
        """Run the blocks called inside in dense mode (for methods such as timm's
        ``forward_intermediates`` that read per-layer token maps)."""
        call, outer = _Call(dense=True), self._call.get()
        self._call.set(call)
        try:
            yield call
        finally:
            self._call.set(outer)
        run = self._run.get()
        if run is not None and run.call is call:
            self._verify(run)

    def _record_grid(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == 4:
            self._grid.set((int(output.shape[-2]), int(output.shape[-1])))

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("output_hidden_states")
        if hidden is None:
            hidden = getattr(getattr(module, "config", None), "output_hidden_states", False)
        self._call.set(_Call(dense=self.target.dense or bool(hidden)))

    def _leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._call.get()
        self._call.set(None)
        if call is None or self.method.budget.is_zero:
            return
        run = self._run.get()
        depth = len(self.target.blocks)
        ran = 0 if run is None or run.call is not call else run.ran
        if ran != depth:
            raise not_applied(
                "block",
                self.method,
                f"{type(module).__name__}.forward ran {ran} of its {depth} patched blocks (a "
                "framework change bypasses the block forwards tokenmerge installed)",
            )

    def _start(self, x: Tensor) -> _Run:
        if self.input_scale is not None:
            if not self._resized.get():
                raise not_applied(
                    "block",
                    self.method,
                    f"input_scale={self.input_scale:g} resizes the images in "
                    f"{type(self.model).__name__}.__call__, which this forward bypassed (call "
                    "the model itself, not forward_features or a submodule)",
                )
            self._resized.set(False)
        b, n, _ = x.shape
        p = min(self.target.n_prefix, n)
        if self.target.init is not None:
            protected, size = self.target.init(x)
        else:
            protected = torch.zeros(b, n, dtype=torch.bool, device=x.device)
            protected[:, :p] = True
            size = None
        grid = self._grid.get()
        self._grid.set(None)  # consumed: a later forward without a patch embedding has none
        if grid is not None and grid[0] * grid[1] != n - p:
            grid = None
        state = TokenState.start(
            x,
            protected,
            size=size,
            grid=grid,
            n_prefix=p,
            depth=len(self.target.blocks),
        )
        call = self._call.get()
        run = _Run(
            state,
            self._schedule(state),
            call=call,
            dense=self.target.dense if call is None else call.dense,
        )
        self._run.set(run)
        return run

    def _schedule(self, st: TokenState) -> list[int | Tensor]:
        depth, budget = len(self.target.blocks), self.method.budget
        if budget.is_zero:
            return [0] * depth
        b, n = st.pos.shape
        if self.target.init is None or b == 0:
            # every sample has the same length and protected prefix: no data to read
            return list(self._resolve(n, st.n_prefix))
        lengths = st.counts.tolist()
        n_prot = (st.protected & st.valid).sum(1).tolist()
        rows: dict[tuple[int, int], tuple[int, ...]] = {}
        for i, key in enumerate(zip(lengths, n_prot, strict=True)):
            if key in rows:
                continue
            try:
                rows[key] = self._resolve(*key)
            except ValueError as e:
                if len(set(lengths)) == 1:
                    raise
                raise ValueError(
                    f"sample {i} of this padded batch has {key[0]} real tokens ({key[1]} "
                    f"protected), and every sample gets the schedule of its own length: {e}. "
                    "Use a budget that scales with the length (tm.KeepRatio(0.9)) or leave short "
                    f"samples unreduced (min_tokens={key[0] + 1} or more)"
                ) from None
        if len(rows) == 1:
            return list(next(iter(rows.values())))
        per = torch.tensor([rows[k] for k in zip(lengths, n_prot, strict=True)])
        return list(per.T.to(st.pos.device))

    def _resolve(self, n: int, p: int) -> tuple[int, ...]:
        if n < self.method.min_tokens:
            return (0,) * len(self.target.blocks)
        budget = self.method.budget  # DToMe's changes while it calibrates
        if budget != self._schedules_for:
            self._schedules, self._schedules_for = {}, budget
        if (n, p) not in self._schedules:  # a pure function of them: solved once per shape
            rs = budget.schedule(n, p, self.target.cost, self.method.max_r)
            self._schedules[n, p] = tuple(rs)
        return self._schedules[n, p]

    def _verify(self, run: _Run) -> None:
        """The self-check: the token counts reached are the ones the schedule asked for."""
        m, st = self.method, run.state
        b = st.pos.shape[0]
        if m.budget.is_zero or m.dynamic or not m.exact_counts or b == 0 or not run.ran:
            return
        rs = run.schedule[: run.ran]
        if st.uniform and all(isinstance(r, int) for r in rs):
            # every sample as wide as the batch: the shapes say it all (no data read)
            want = [st.n_orig - sum(rs[: i + 1]) for i in range(len(rs))]
            bad = [i for i, (g, w) in enumerate(zip(run.widths, want, strict=True)) if g != w]
            if bad:
                i = bad[0]
                self._fail(f"after block {i} every sample has {run.widths[i]} tokens", want[i])
            return
        got = torch.stack(st.tokens_per_layer[: run.ran])  # [L, B]
        start = st.tokens_in if st.tokens_in is not None else torch.full((b,), st.n_orig)
        steps = [torch.as_tensor(r).expand(b) for r in rs]
        want_t = start.to(got.device) - torch.stack(steps).to(got.device).cumsum(0)
        bad_t = (got != want_t).nonzero()
        if len(bad_t):
            layer, sample = (int(v) for v in bad_t[0])
            self._fail(
                f"after block {layer} sample {sample} has {int(got[layer, sample])} tokens",
                int(want_t[layer, sample]),
            )

    def _fail(self, what: str, want: int) -> None:
        raise not_applied("block", self.method, f"{what}, but the schedule leaves {want}")

    def _make_forward(self, block: nn.Module, i: int) -> Callable[..., Tensor | tuple[Tensor]]:
        spec, method = self.target.spec, self.method
        depth = len(self.target.blocks)

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor]:
            run = self._start(x) if i == 0 else self._run.get()
            if run is None or run.ran != i:
                raise RuntimeError(
                    f"tokenmerge: patched block {i} ran out of order (after "
                    f"{'no block' if run is None else f'{run.ran} blocks'}); the blocks of a "
                    "patched model must run once each, in order (layer dropping and "
                    "gradient checkpointing are not supported)"
                )
            st = run.state
            if i == 0 and self.target.init is None and not self.method.budget.is_zero:
                refuse_custom_mask(args, kwargs)
            grid_in = x
            if run.dense and run.reduced:  # the full grid the previous block handed on
                x = from_grid(st, x, i)
            if run.reduced:
                mask = st.attn_bias(self.prop_attn, x.dtype)
            else:  # nothing reduced yet: the model's own mask, so budget 0 is bit-identical
                mask = callers_mask(args, kwargs)
            cap: dict[str, Tensor] = {}
            self._cap.set(cap)
            try:
                if spec.positions:  # position-aware: the model's call, and where tokens came from
                    call = BlockCall(args, kwargs, st.pos if run.reduced else None)
                    a = spec.attn(block, x, mask, call)
                else:
                    a = spec.attn(block, x, mask)
                h = a if spec.post_norm else x + a
            finally:
                self._cap.set(None)
            r = run.schedule[i]
            if h.shape[0] == 0:  # an empty batch: no scores, only the shapes of the schedule
                if has_work(r) and not method.dynamic and method.exact_counts:
                    h = st.reduce(h, empty_reduction(h.shape[1], h.shape[1] - int(r), h.device))
                    run.reduced = True
            elif method.dynamic or has_work(r):
                sig = Signals(
                    x=h,
                    k=split_heads(cap["k"], spec.layout, spec.heads(block), 1),
                    q=split_heads(cap["q"], spec.layout, spec.heads(block), 0)
                    if "q" in cap
                    else None,
                    scale=spec.scale(block),
                    # before the first reduction, still hide padding from explicit attention
                    bias=mask if run.reduced else st.attn_bias(False, h.dtype),
                )
                red = method.reduce(sig, st, r, i)
                if red is not None:
                    h = st.reduce(h, red)
                    if self.target.compact_padding:
                        h = drop_padding(st, h)
                    run.reduced = True
            m = mlp_on_real_tokens(spec, block, h, st) if run.reduced else spec.mlp(block, h)
            out = m if spec.post_norm else h + m
            st.tokens_per_layer.append(st.counts)
            run.widths.append(h.shape[1])
            run.ran += 1
            if run.dense and run.reduced:
                out = to_grid(st, out, grid_in)
            if run.ran == depth:
                self._verify(run)
            return (out,) if spec.returns_tuple else out

        return forward


def _refuse_pickle(patch: Patch, obj: nn.Module) -> Callable[[int], Any]:
    """A ``__reduce_ex__`` that says how to save a patched model instead of a pickling error
    about local functions."""

    def reduce_ex(protocol: int) -> Any:
        raise TypeError(
            f"cannot pickle {type(obj).__name__}: it is patched by tokenmerge "
            f"({patch.method.name} on {type(patch.model).__name__}), and a patch's hooks and "
            "per-forward state do not pickle. Call tokenmerge.remove(model) first (save the "
            "unpatched model or its state_dict, and call tokenmerge.apply again after "
            "loading); copy.deepcopy(model) of the patched model itself works"
        )

    return reduce_ex
