"""The KV cache of a patched decoder: :class:`ReducedCache`, and helpers on any cache."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from ..base import ContextSlot

if TYPE_CHECKING:
    from ...methods.kv import KVContext

# The cache being served by a patched forward in this context (guards against silent misuse);
# a ContextVar when eager, an attribute while torch.compile traces (see base.ContextSlot).
_SERVING = ContextSlot("tokenmerge_serving")


class ReducedCache(DynamicCache):
    """A ``DynamicCache`` whose layers may hold a subset of the tokens it has seen.

    Attributes:
        seen: tokens seen so far (the length of the original stream). ``get_seq_length``
            returns it, so new tokens get the right RoPE positions and ``generate`` slices its
            inputs correctly; ``get_query_offset`` (used for mask sizes) returns what a layer
            stores.
        orig_valid: ``[B, seen]`` which original tokens are real (not padding).
        index: per reduced layer, ``[B, H_kv, L]`` original index of each stored entry
            (``-1``: empty slot). Layers absent from it store their tokens unreduced.
        stats: per layer, running statistics of stateful KV methods, aligned with the entries.
        peak_bytes: the most bytes the cache has held at once (keys, values and indices).
        budgets: per layer, ``[B]`` entries a method that evicts while decoding (TOVA) holds
            the layer at.
        ragged: the layers whose heads hold different numbers of entries (AdaKV); their
            attention masks are built per head.
    """

    def __init__(self, config: Any = None) -> None:
        super().__init__(config=config)
        self.seen = 0
        #: original tokens of the forward under way (set by the runtime; None: as stored)
        self.incoming: int | None = None
        self.orig_valid: Tensor | None = None
        self.index: dict[int, Tensor] = {}
        self.stats: dict[int, dict[str, Tensor]] = {}
        self.peak_bytes = 0
        self.budgets: dict[int, Tensor] = {}
        self.ragged: set[int] = set()
        #: ``update`` calls so far (the runtime checks that every attention layer wrote here)
        self.writes = 0
        self._holes = False
        # validity masks not inspected yet (read lazily: no device sync on the hot path)
        self._pending: list[Tensor] = []

    # -------------------------------------------------------------- HF cache API
    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kw: Any
    ) -> tuple[Tensor, Tensor]:
        if self.index and _SERVING.get() is not self:
            raise RuntimeError(
                "this cache holds a reduced subset of its tokens (tokenmerge); keep the model "
                "patched with tm.apply while using it, so that attention masks follow the "
                "entries each layer kept"
            )
        if layer_idx == 0:  # a reduction before layer 0 stores fewer entries than it saw
            self.seen += key_states.shape[-2] if self.incoming is None else self.incoming
            self.incoming = None
        self.writes += 1
        return super().update(key_states, value_states, layer_idx, *args, **kw)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if self.index:
            raise NotImplementedError("a reduced cache cannot be cropped")
        super().crop(tokens_to_remove)
        self.seen = super().get_seq_length(0)
        if self.orig_valid is not None:
            self.orig_valid = self.orig_valid[:, : self.seen]

    def _each_batch_tensor(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.orig_valid is not None:
            self.orig_valid = fn(self.orig_valid)
        self.index = {i: fn(t) for i, t in self.index.items()}
        self.stats = {i: {k: fn(v) for k, v in s.items()} for i, s in self.stats.items()}
        self.budgets = {i: fn(t) for i, t in self.budgets.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._each_batch_tensor(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._each_batch_tensor(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._each_batch_tensor(lambda t: t.index_select(0, beam_idx.to(t.device)))

    # -------------------------------------------------------------- bookkeeping
    @property
    def holes(self) -> bool:
        """Some stored entry may be padding or an empty slot (conservative; lets decoding skip
        building masks when every entry is real)."""
        flag = self.hole_flag()
        self.holes = bool(flag)
        return self._holes

    def hole_flag(self) -> bool | Tensor:
        """:attr:`holes` without a device sync: a bool, or a 0-d bool tensor while validity
        masks are still pending."""
        if self._holes or not self._pending:
            return self._holes
        return torch.stack([~v.all() for v in self._pending]).any()

    @holes.setter
    def holes(self, value: bool) -> None:
        self._holes = bool(value)
        self._pending = []

    def note_valid(self, valid: Tensor) -> None:
        """Record that entries with validity ``valid`` were stored (inspected only when
        :attr:`holes` is read)."""
        if valid.numel() and not self._holes:  # once known to have holes, it keeps them
            self._pending.append(valid)
        if len(self._pending) > 32:  # long decodes: fold into one flag, still without a sync
            self._pending = [torch.stack([v.all() for v in self._pending]).all()]

    @property
    def reduced(self) -> bool:
        """Whether any layer stores fewer entries than the tokens it has seen."""
        return bool(self.index)

    def stored(self, layer: int) -> int:
        """Entries stored by ``layer`` (padding slots included)."""
        if layer >= len(self.layers) or not self.layers[layer].is_initialized:
            return 0
        keys = self.layers[layer].keys
        return 0 if keys is None or keys.numel() == 0 else keys.shape[-2]

    def layer_index(self, layer: int, seen: int | None = None) -> Tensor | None:
        """``[B, H_kv, L]`` original index of the entries ``layer`` stores."""
        if layer in self.index:
            return self.index[layer]
        n = self.stored(layer)
        if n == 0:
            return None
        keys = self.layers[layer].keys
        seen = self.seen if seen is None else seen
        ar = torch.arange(seen - n, seen, device=keys.device)
        return ar.expand(keys.shape[0], keys.shape[1], n)

    def valid_of(self, index: Tensor) -> Tensor:
        """Which of the entries with original ``index`` (``[B, ..., L]``) are real tokens."""
        ok = index >= 0
        if self.orig_valid is None:
            return ok
        flat = index.clamp_min(0).flatten(1)
        real = self.orig_valid.gather(1, flat.clamp_max(self.orig_valid.shape[1] - 1))
        return ok & real.view_as(index)

    def position_of(self, index: Tensor) -> Tensor:
        """Position of each entry in its own sequence (padding not counted)."""
        if self.orig_valid is None:
            return index.clamp_min(0)
        pos = self.orig_valid.long().cumsum(1) - 1
        flat = index.clamp_min(0).flatten(1).clamp_max(pos.shape[1] - 1)
        return pos.gather(1, flat).view_as(index).clamp_min(0)

    @property
    def nbytes(self) -> int:
        """Bytes held now: keys, values and the reduced layers' index tables."""
        return kv_bytes(self)


def kv_bytes(cache: Any) -> int:
    """Bytes of the keys and values a cache holds (plus a :class:`ReducedCache`'s indices)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    for t in getattr(cache, "index", {}).values():
        total += t.numel() * t.element_size()
    return total


def fork_cache(cache: DynamicCache) -> DynamicCache:
    """A copy of ``cache`` that shares its tensors (no data copied).

    Cache updates are out of place (``torch.cat``, gathers), so running the fork leaves the
    original untouched: use it to decode several continuations from one prefill.
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if isinstance(cache, ReducedCache):
        new._pending = list(cache._pending)
        new.index = dict(cache.index)
        new.stats = {i: dict(s) for i, s in cache.stats.items()}
        new.budgets = dict(cache.budgets)
        new.ragged = set(cache.ragged)
    return new


def _evict(
    cache: ReducedCache,
    i: int,
    ctx: KVContext,
    index: Tensor,
    slot_valid: Tensor,
    holes: bool | None = None,
) -> None:
    """Keep entries ``index`` (``[B, H_kv, K]``) of layer ``i``; empty slots get index -1.
    ``slot_valid`` is ``[B, K]``, or ``[B, H_kv, K]`` when heads keep different numbers
    (the cache becomes :attr:`~ReducedCache.ragged`). ``holes``: whether some slot is empty,
    when the caller knows (else read lazily)."""
    layer = cache.layers[i]
    d = layer.keys.shape[-1]
    g = index[..., None].expand(-1, -1, -1, d)
    per_head = slot_valid if slot_valid.dim() == 3 else slot_valid[:, None, :]
    zero = ~per_head[..., None]
    layer.keys = layer.keys.gather(2, g).masked_fill(zero, 0.0)
    layer.values = layer.values.gather(2, g).masked_fill(zero, 0.0)
    kept = ctx.index.gather(2, index)
    cache.index[i] = kept.masked_fill(~per_head, -1)
    if slot_valid.dim() == 3:
        cache.ragged.add(i)
    if holes is None:
        cache.note_valid(per_head.flatten(1))
    elif holes:
        cache.holes = True
    if ctx.stats:
        cache.stats[i] = {k: v.gather(2, index) for k, v in ctx.stats.items()}
