"""The state of one forward of a patched decoder: what it does to the cache, and what it saw."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ...core.state import Signals
from ...methods.kv import KVContext
from .cache import ReducedCache


@dataclass
class _Plan:
    """What a forward does to the KV cache. ``caps[layer]``: ``[B]`` entries kept (``None``:
    from the method's ratio); ``evict=False`` only tracks statistics; ``track=False`` not
    even that (the scoring forwards after a prefill, which only an observer reads)."""

    evict: bool = True
    caps: dict[int, Tensor] | None = None
    window: int = 0
    track: bool = True


_PLAN: contextvars.ContextVar[_Plan | None] = contextvars.ContextVar(
    "tokenmerge_plan", default=None
)
_OBSERVER: contextvars.ContextVar[Callable[[KVContext], None] | None] = contextvars.ContextVar(
    "tokenmerge_observer", default=None
)


@dataclass
class _Forward:
    """One forward pass of the patched base model."""

    cache: ReducedCache | None
    fresh: bool  # the forward starts from an empty cache (a prefill)
    seen: int  # tokens seen before this forward
    rep: Tensor  # [B, n] original index of the current hidden slots
    valid: Tensor  # [B, n] the slot holds a real token
    input_valid: Tensor  # [B, q] which input tokens of this forward are real
    plan: _Plan | None
    own_masks: bool  # masks are built here (the cache is reduced)
    padded: bool = False  # some slot may not hold a real token (known without a device sync)
    holes: bool = True  # some stored entry may be padding or an empty slot
    evicts: bool = False  # a KV eviction is scheduled in this forward (checked)
    sel: Tensor | None = None  # [B, n] slot -> input position, once hidden states are reduced
    span_count: Tensor | None = None  # [B] span tokens at the start (decoder site)
    span_input: Tensor | None = None  # [B, q] input tokens that may be reduced (a VLM's images)
    cells: Tensor | None = None  # [B, q] a video token's cell id per input position (Signals.cell)
    # DyMU's virtual unmerging: [B, q] slot of the reduced stream each input position belongs
    # to (padding -> a spare slot past the end); attention runs on the q positions
    virtual: Tensor | None = None
    signals: dict[int, Signals] = field(default_factory=dict)
    schedule: dict[int, float] = field(default_factory=dict)
    tokens_per_layer: list[Tensor] = field(default_factory=list)
    pe_cache: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    serving: bool = False  # the cache is served (until _release)
    serve_prev: Any = None  # what was served before this forward
    # self-check bookkeeping
    writes: int = 0  # the cache's write count when the last attention hook ran
    writes0: int = 0  # ... when the forward started
    layers_ran: list[int] = field(default_factory=list)  # layers whose pre-hook ran
    attn_ran: list[int] = field(default_factory=list)  # layers whose attention hook ran
    done: set[int] = field(default_factory=set)  # scheduled layers whose reduction step ran
    evicted: dict[int, int] = field(default_factory=dict)  # layer -> entries kept per head
    checks: list[tuple[Tensor, Callable[[], str]]] = field(default_factory=list)
    # methods that score after the prefill (KVzip): the layers waiting, and the prefill's input
    deferred: dict[int, KVContext] = field(default_factory=dict)
    inputs: tuple[Tensor | None, Tensor | None] | None = None  # (input_ids, inputs_embeds)
    position_ids: Tensor | None = None  # the prefill's, when the caller passed them

    @property
    def hidden_reduced(self) -> bool:
        return self.sel is not None

    @property
    def checked(self) -> bool:
        """Something is scheduled in this forward, so the self-check runs."""
        return self.evicts or bool(self.schedule)


@dataclass
class _Outer:
    """One call of a patched ``...ForCausalLM`` (around its base model's forward)."""

    run: _Forward | None = None  # the base model's forward inside this call
    labels: Tensor | None = None  # taken over when the decoder site shortens the sequence
    loss_kw: dict[str, Any] = field(default_factory=dict)
