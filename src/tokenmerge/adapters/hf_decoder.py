"""Hugging Face decoder LLMs (Llama, SmolLM2, Qwen2/3, Mistral, Gemma 3 text): the KV-cache
site and the layer-K hidden-state site, on stock ``transformers`` with no copied forward.

How it hooks in (everything is removed again by ``tm.remove``):

- a forward **pre-hook on the base model** (``LlamaModel`` ...) starts the per-forward state: it
  swaps a fresh cache for a :class:`ReducedCache`, records which new tokens are padding, and,
  once the cache holds a reduced subset of its tokens, takes the attention mask over;
- a forward **pre-hook on every decoder layer** reduces the hidden states at layer K (decoder
  site), gives later layers the position embeddings of the kept tokens (their *original*
  positions, so RoPE stays exact) and the attention mask of what that layer's cache really
  holds;
- a forward **hook on every attention module** runs right after that layer's attention: it
  keeps the cache's bookkeeping (original index of every stored entry), lets a KV method evict
  entries of that layer at once (so peak memory falls, not only the final size), and computes
  the scoring signals a decoder method needs at layer K-1.

The model's own attention function (``sdpa`` or ``eager`` from ``ALL_ATTENTION_FUNCTIONS``) runs
unchanged; masks are handed to it through its normal ``attention_mask`` argument. Attention
probabilities for scoring are computed explicitly, only at the scoring layer and only for the
queries a method asks for.

:class:`ReducedCache` is a ``DynamicCache`` that knows how many tokens it has *seen* (which is
what ``get_seq_length`` reports, so ``generate`` and RoPE positions continue at the right
place) while each layer may store fewer. Reduced caches must be used with the model patched.

:func:`chunked_prefill` is Locret's pipeline: prefill chunk by chunk and, after each chunk's
attention at each layer, evict that layer's cache to a fixed budget with the patched KV method,
keeping a stabilising window of recent tokens. The KV cache then never holds more than
``budget + chunk`` entries per layer, whatever the context length. (Locret's trained retaining
heads are not included: any training-free scorer takes their place.)

When things happen. A method reduces only in a *prefill*: a forward that starts from an empty
cache (or every chunk of :func:`chunked_prefill`). Later forwards (decoding, a question
appended to a compressed context) attend to what was kept and add their own tokens unreduced.
Positions are always the original ones: kept keys keep their RoPE phase, tokens kept at layer K
are rotated at their original positions, and new tokens continue after every token seen.

Usage::

    tm.apply(model, tm.get_method("snapkv", ratio=0.75))      # 4x smaller KV cache
    out = model.generate(ids, attention_mask=mask, max_new_tokens=32)   # compressed prefill

    pre = chunked_prefill(model, context_ids, chunk=512)        # query-agnostic, chunked
    out = model.generate(torch.cat([context_ids, question_ids], 1),
                         past_key_values=pre.cache, max_new_tokens=32)

    tm.apply(model, tm.get_method("fastv", ratio=0.5, layer=2))  # layer-K pruning
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..core.flops import CostModel
from ..core.state import Signals, TokenState
from ..methods.base import Method
from ..methods.decoder import DecoderMethod
from ..methods.kv import KVContext, KVMethod
from .base import ADAPTERS, Adapter, Patch, Target, UnsupportedModelError

__all__ = [
    "SUPPORTED",
    "DecoderAdapter",
    "Prefill",
    "ReducedCache",
    "chunked_prefill",
    "compress",
    "fork_cache",
    "kv_bytes",
    "observe",
    "runtime_of",
]

#: model class -> (decoder layer class, attention class)
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention"),
    "LlamaModel": ("LlamaDecoderLayer", "LlamaAttention"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention"),
    "Qwen2Model": ("Qwen2DecoderLayer", "Qwen2Attention"),
    "Qwen3ForCausalLM": ("Qwen3DecoderLayer", "Qwen3Attention"),
    "Qwen3Model": ("Qwen3DecoderLayer", "Qwen3Attention"),
    "MistralForCausalLM": ("MistralDecoderLayer", "MistralAttention"),
    "MistralModel": ("MistralDecoderLayer", "MistralAttention"),
    "Gemma3ForCausalLM": ("Gemma3DecoderLayer", "Gemma3Attention"),
    "Gemma3TextModel": ("Gemma3DecoderLayer", "Gemma3Attention"),
}
#: attention implementations whose mask format the adapter writes
IMPLEMENTATIONS = ("sdpa", "eager")
ATTR = "_tokenmerge_decoder"


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

# The cache being served by a patched forward in this context (guards against silent misuse).
_SERVING: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "tokenmerge_serving", default=None
)


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
    """

    def __init__(self, config: Any = None) -> None:
        super().__init__(config=config)
        self.seen = 0
        self.orig_valid: Tensor | None = None
        self.index: dict[int, Tensor] = {}
        self.stats: dict[int, dict[str, Tensor]] = {}
        self.peak_bytes = 0
        #: some stored entry may be padding or an empty slot (conservative; lets decoding skip
        #: building masks when every entry is real)
        self.holes = False

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
        if layer_idx == 0:
            self.seen += key_states.shape[-2]
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
        new.index = dict(cache.index)
        new.stats = {i: dict(s) for i, s in cache.stats.items()}
    return new


# --------------------------------------------------------------------------------------------
# Per-forward state
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a forward does to the KV cache. ``caps[layer]``: ``[B]`` entries kept (``None``:
    from the method's ratio); ``evict=False`` only tracks statistics."""

    evict: bool = True
    caps: dict[int, Tensor] | None = None
    window: int = 0


_PLAN: contextvars.ContextVar[_Plan | None] = contextvars.ContextVar(
    "tokenmerge_plan", default=None
)
_OBSERVER: contextvars.ContextVar[Callable[[KVContext], None] | None] = contextvars.ContextVar(
    "tokenmerge_observer", default=None
)


@dataclass
class _Forward:
    """One forward pass of the patched model."""

    cache: ReducedCache | None
    fresh: bool  # the forward starts from an empty cache (a prefill)
    seen: int  # tokens seen before this forward
    rep: Tensor  # [B, n] original index of the current hidden slots
    valid: Tensor  # [B, n] the slot holds a real token
    input_valid: Tensor  # [B, q] which input tokens of this forward are real
    plan: _Plan | None
    own_masks: bool  # masks are built here (the cache is reduced)
    all_valid: bool = True  # every current slot is a real token
    sel: Tensor | None = None  # [B, n] slot -> input position, once hidden states are reduced
    span_count: Tensor | None = None  # [B] span tokens at the start (decoder site)
    signals: dict[int, Signals] = field(default_factory=dict)
    schedule: dict[int, float] = field(default_factory=dict)
    tokens_per_layer: list[Tensor] = field(default_factory=list)
    pe_cache: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    serve_token: contextvars.Token | None = None

    @property
    def hidden_reduced(self) -> bool:
        return self.sel is not None


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _project(attn: nn.Module, proj: str, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Queries or keys of ``attn`` for hidden states ``h`` ``[B, n, C]``, post-RoPE:
    ``[B, heads, n, d]`` (q/k-norm applied when the family has it)."""
    b, n, _ = h.shape
    x = getattr(attn, f"{proj}_proj")(h).view(b, n, -1, attn.head_dim)
    norm = getattr(attn, f"{proj}_norm", None)
    if norm is not None:
        x = norm(x)
    x = x.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _left_align(valid: Tensor) -> Tensor:
    """Permutation ``[B, n]`` that moves the valid slots (in order) to the right end."""
    n = valid.shape[1]
    ar = torch.arange(n, device=valid.device)
    return (valid.long() * n + ar).argsort(dim=1)


def _gather_seq(t: Tensor, sel: Tensor) -> Tensor:
    """Gather ``t`` ``[1 or B, N, ...]`` along dim 1 with ``sel`` ``[B, n]``."""
    t = t.expand(sel.shape[0], *t.shape[1:])
    idx = sel.reshape(*sel.shape, *([1] * (t.dim() - 2))).expand(*sel.shape, *t.shape[2:])
    return t.gather(1, idx)


def _window_of(attn: nn.Module, config: Any) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if type(attn).__name__ == "MistralAttention":
        return getattr(config, "sliding_window", None)
    return None


# --------------------------------------------------------------------------------------------
# The runtime: hooks of one patched model
# --------------------------------------------------------------------------------------------


class _Runtime:
    """The hooks of one patched model and the state of its forwards (a context variable)."""

    def __init__(self, model: nn.Module, inner: nn.Module, layers: Sequence[nn.Module]) -> None:
        self.model = model
        self.inner = inner
        self.config = inner.config
        self.layers = list(layers)
        self.attns = [layer.self_attn for layer in self.layers]
        self.depth = len(self.layers)
        self.impl = self.config._attn_implementation
        self.windows = [_window_of(a, self.config) for a in self.attns]
        self.method: Method | None = None
        self._fwd: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar(
            f"tokenmerge_fwd_{id(self)}", default=None
        )
        self._last: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar(
            f"tokenmerge_last_{id(self)}", default=None
        )

    def bind(self, patch: Patch) -> _Runtime:
        method = patch.method
        if isinstance(method, KVMethod):
            method.check_depth(self.depth)
        elif isinstance(method, DecoderMethod):
            method.schedule(self.depth)  # validates the layers
        self.method = method
        return self

    # -------------------------------------------------------------- properties
    @property
    def kv(self) -> KVMethod | None:
        return self.method if isinstance(self.method, KVMethod) else None

    @property
    def decoder(self) -> DecoderMethod | None:
        return self.method if isinstance(self.method, DecoderMethod) else None

    @property
    def last(self) -> _Forward | None:
        """State of the latest forward in this context (for inspection and tests)."""
        return self._last.get()

    # -------------------------------------------------------------- base model hooks
    def model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        if ref is None:
            return args, kwargs
        b, q = ref.shape[0], ref.shape[1]
        device = ref.device
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        cache = kwargs.get("past_key_values")
        seen = cache.get_seq_length() if cache is not None else 0
        if cache is None and use_cache:
            cache = ReducedCache(config=self.config)
        elif type(cache) is DynamicCache and cache.get_seq_length() == 0:
            cache = ReducedCache(config=self.config)  # generate's fresh cache
        if cache is not None and not isinstance(cache, ReducedCache):
            if not self._may_reduce() or (isinstance(cache, DynamicCache) and seen > 0):
                cache = None  # nothing to reduce, or a cache prefilled elsewhere: run as is
            else:
                raise UnsupportedModelError(
                    f"{type(cache).__name__} is not supported by the hf-decoder adapter; use a "
                    "DynamicCache (the default) or tokenmerge's ReducedCache"
                )
        if cache is not None and kwargs.get("past_key_values") is not cache:
            kwargs["past_key_values"] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            if self._may_reduce() or (cache is not None and cache.reduced):
                raise ValueError(
                    "the hf-decoder adapter needs a 2-D attention_mask (or none); "
                    f"got a {mask.dim()}-D mask"
                )
            mask = None
        new_valid = (
            mask[:, -q:].to(device=device, dtype=torch.bool)
            if mask is not None
            else torch.ones(b, q, dtype=torch.bool, device=device)
        )
        if cache is not None:
            have = 0 if cache.orig_valid is None else cache.orig_valid.shape[1]
            old = cache.orig_valid
            if have < seen:  # tokens written while unpatched: assume real
                fill = torch.ones(b, seen - have, dtype=torch.bool, device=device)
                old = fill if old is None else torch.cat([old, fill], 1)
            cache.orig_valid = new_valid if old is None else torch.cat([old, new_valid], 1)
        fresh = seen == 0
        plan = _PLAN.get()
        if plan is None and fresh and self.kv is not None and not self.kv.is_identity:
            plan = _Plan(evict=True)
        own = cache is not None and cache.reduced
        run = _Forward(
            cache=cache,
            fresh=fresh,
            seen=seen,
            rep=torch.arange(seen, seen + q, device=device).expand(b, q),
            valid=new_valid,
            input_valid=new_valid,
            plan=plan if self.kv is not None or _OBSERVER.get() is not None else None,
            own_masks=own,
            all_valid=bool(new_valid.all()),
        )
        if cache is not None and not run.all_valid:
            cache.holes = True
        dec = self.decoder
        if dec is not None and fresh and not dec.is_identity:
            run.schedule = dict(dec.schedule(self.depth))
            pos = new_valid.long().cumsum(1) - 1
            run.span_count = (dec.span_mask(pos, new_valid.sum(1)) & new_valid).sum(1)
        if own and kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = None  # HF's own mask would index the stored entries wrongly
        self._fwd.set(run)
        run.serve_token = _SERVING.set(cache)
        return args, kwargs

    def model_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        run = self._fwd.get()
        if run is None:
            return output
        if run.serve_token is not None:
            _SERVING.reset(run.serve_token)
            run.serve_token = None
        cache = run.cache
        if cache is not None:
            # sliding layers trim from the front: keep their index tables aligned
            for i, idx in list(cache.index.items()):
                n = cache.stored(i)
                if idx.shape[-1] != n:
                    cache.index[i] = idx[..., -n:] if n else idx[..., :0]
            cache.peak_bytes = max(cache.peak_bytes, cache.nbytes)
        run.signals.clear()
        run.pe_cache.clear()
        self._last.set(run)
        self._fwd.set(None)
        return output

    def _may_reduce(self) -> bool:
        m = self.method
        return m is not None and not getattr(m, "is_identity", True)

    # -------------------------------------------------------------- decoder layer hook
    def layer_pre(self, i: int) -> Callable[..., tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            run = self._fwd.get()
            if run is None:
                return args, kwargs
            if i in run.schedule:
                args, kwargs = self._reduce_hidden(i, run, args, kwargs)
            if run.hidden_reduced:
                pe = kwargs.get("position_embeddings")
                if pe is not None:
                    key = id(pe[0])
                    if key not in run.pe_cache:
                        run.pe_cache[key] = (
                            _gather_seq(pe[0], run.sel),
                            _gather_seq(pe[1], run.sel),
                        )
                    kwargs["position_embeddings"] = run.pe_cache[key]
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], run.sel)
            if run.own_masks or run.hidden_reduced:
                kwargs["attention_mask"] = self._mask(i, run)
            return args, kwargs

        return hook

    def _mask(self, i: int, run: _Forward) -> Tensor | None:
        """The attention mask of layer ``i`` over what its cache stores plus the new slots."""
        cache = run.cache
        q_idx, q_ok = run.rep, run.valid
        k_idx, k_ok = q_idx, q_ok
        if q_idx.shape[1] == 1 and self.windows[i] is None and (cache is None or not cache.holes):
            return None  # decoding one token that may see every stored entry
        if cache is not None:
            past = cache.layer_index(i, seen=run.seen)
            if past is not None:
                p = past[:, 0]
                k_idx = torch.cat([p, q_idx], 1)
                k_ok = torch.cat([cache.valid_of(p), q_ok], 1)
        window = self.windows[i]
        allowed = k_ok[:, None, :] & (k_idx[:, None, :] <= q_idx[:, :, None])
        if window is not None:
            allowed &= (q_idx[:, :, None] - k_idx[:, None, :]) < window
        allowed = allowed[:, None]
        if self.impl == "eager":
            dtype = self.inner.dtype if hasattr(self.inner, "dtype") else torch.float32
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min)
        return allowed

    def _reduce_hidden(self, i: int, run: _Forward, args: tuple, kwargs: dict) -> tuple:
        method = self.decoder
        x = args[0] if args else kwargs["hidden_states"]
        sig = run.signals.pop(i, None)
        # a fresh forward: original index = input position
        pos_table = run.input_valid.long().cumsum(1) - 1
        lengths = run.input_valid.sum(1)
        pos = pos_table.gather(1, run.rep.clamp(0, pos_table.shape[1] - 1))
        in_span = method.span_mask(pos, lengths) & run.valid
        target = torch.round(run.span_count.double() * run.schedule[i]).long()
        r = (in_span.sum(1) - target).clamp_min(0)
        r = torch.where(lengths < method.min_tokens, torch.zeros_like(r), r)
        if sig is None or not bool((r > 0).any()):
            return args, kwargs
        sig.x = x
        state = TokenState.start(x, run.valid & ~in_span, size=run.valid.to(x.dtype))
        red = method.reduce(sig, state, r, i)
        if red is None:
            return args, kwargs
        y, size = red.apply(x, state.size)
        rep = run.rep.gather(1, red.rep)
        valid = size > 0
        perm = _left_align(valid)
        y = _gather_seq(y, perm)
        rep = rep.gather(1, perm)
        valid = valid.gather(1, perm)
        rep = torch.where(valid, rep, torch.zeros_like(rep))
        run.rep, run.valid = rep, valid
        run.all_valid = bool(valid.all())
        run.sel = (rep - run.seen).clamp_min(0)
        run.pe_cache.clear()
        if args:
            args = (y, *args[1:])
        else:
            kwargs["hidden_states"] = y
        return args, kwargs

    # -------------------------------------------------------------- attention hook
    def attn_post(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            run = self._fwd.get()
            if run is None:
                return output
            if (i + 1) in run.schedule:
                run.signals[i + 1] = self._signals(module, run, kwargs)
            if run.cache is not None:
                self._after_attention(i, module, run, kwargs)
            run.tokens_per_layer.append(run.valid.sum(1))
            return output

        return hook

    def _signals(self, attn: nn.Module, run: _Forward, kwargs: dict) -> Signals:
        """Layer K-1's queries and keys (repeated to the query heads) for a decoder method."""
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        groups = attn.num_key_value_groups
        k = _project(attn, "k", h, cos, sin).repeat_interleave(groups, dim=1)
        ok = run.valid
        if self.decoder.query == "last":
            q = _project(attn, "q", h[:, -1:], cos[:, -1:], sin[:, -1:])
            bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~ok, -math.inf)[:, None, None, :]
        else:
            q = _project(attn, "q", h, cos, sin)
            allowed = ok[:, None, :] & (run.rep[:, None, :] <= run.rep[:, :, None])
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~allowed, -math.inf)[:, None]
        return Signals(x=h, k=k, q=q, scale=float(attn.scaling), bias=bias)

    def _after_attention(self, i: int, attn: nn.Module, run: _Forward, kwargs: dict) -> None:
        cache = run.cache
        layer = cache.layers[i]
        n = cache.stored(i)
        n_new = run.rep.shape[1]
        if run.hidden_reduced or i in cache.index:
            old = cache.index.get(i)
            hk = layer.keys.shape[1]
            new_idx = run.rep if run.all_valid else run.rep.masked_fill(~run.valid, -1)
            new = new_idx[:, None, :].expand(-1, hk, -1)
            if old is None:
                n_old = max(n - n_new, 0)  # a sliding layer may have dropped old entries
                ar = torch.arange(run.seen - n_old, run.seen, device=new.device)
                old = ar.expand(new.shape[0], hk, n_old)
            cache.index[i] = torch.cat([old, new], -1)[..., -n:] if n else new[..., :0]
            if not run.all_valid:
                cache.holes = True
        if i in cache.stats:  # keep running statistics aligned with the entries
            cache.stats[i] = {
                k: torch.nn.functional.pad(v, (0, n_new))[..., -n:]
                for k, v in cache.stats[i].items()
            }
        if run.plan is not None or run.hidden_reduced:  # a prefill: the peak may be now
            cache.peak_bytes = max(cache.peak_bytes, cache.nbytes)
        kv, observer = self.kv, _OBSERVER.get()
        if (kv is None and observer is None) or run.plan is None or n < n_new:
            return  # nothing to do, or a sliding layer that already dropped part of the input
        ctx = self._context(i, attn, run, kwargs)
        if kv is not None:
            updates = kv.update_stats(ctx)
            if updates:
                ctx.stats.update(updates)
                cache.stats[i] = dict(ctx.stats)
        if observer is not None:
            observer(ctx)
        plan = run.plan
        if kv is None or not plan.evict:
            return
        counts = ctx.counts
        if plan.caps is not None:
            keep = torch.minimum(plan.caps[i].to(counts.device), counts)
        else:
            keep = kv.keep(counts, i)
        keep = torch.where(counts < kv.min_tokens, counts, keep)
        if bool((keep >= counts).all()):
            return
        forced = ctx.recent(min(plan.window, n)) if plan.window > 0 else None
        index, slot_valid = kv.select(ctx, keep, forced)
        _evict(cache, i, ctx, index, slot_valid)
        cache.peak_bytes = max(cache.peak_bytes, cache.nbytes)

    def _context(self, i: int, attn: nn.Module, run: _Forward, kwargs: dict) -> KVContext:
        cache = run.cache
        layer = cache.layers[i]
        n_new = run.rep.shape[1]
        index = cache.layer_index(i)
        valid = cache.valid_of(index[:, 0])
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]

        def query_fn(start: int, stop: int) -> Tensor:
            return _project(attn, "q", h[:, start:stop], cos[:, start:stop], sin[:, start:stop])

        stats = dict(cache.stats.get(i, {}))
        return KVContext(
            layer=i,
            keys=layer.keys,
            values=layer.values,
            index=index,
            valid=valid,
            position=cache.position_of(index),
            n_new=n_new,
            scale=float(attn.scaling),
            groups=attn.num_key_value_groups,
            query_index=run.rep,
            query_valid=run.valid,
            query_fn=query_fn,
            stats=stats,
            softcap=getattr(attn, "attn_logit_softcapping", None),
        )


def _evict(cache: ReducedCache, i: int, ctx: KVContext, index: Tensor, slot_valid: Tensor) -> None:
    """Keep entries ``index`` (``[B, H_kv, K]``) of layer ``i``; empty slots get index -1."""
    layer = cache.layers[i]
    d = layer.keys.shape[-1]
    g = index[..., None].expand(-1, -1, -1, d)
    zero = ~slot_valid[:, None, :, None]
    layer.keys = layer.keys.gather(2, g).masked_fill(zero, 0.0)
    layer.values = layer.values.gather(2, g).masked_fill(zero, 0.0)
    kept = ctx.index.gather(2, index)
    cache.index[i] = kept.masked_fill(~slot_valid[:, None, :], -1)
    if not bool(slot_valid.all()):
        cache.holes = True
    if ctx.stats:
        cache.stats[i] = {k: v.gather(2, index) for k, v in ctx.stats.items()}


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


def _inner(model: nn.Module) -> nn.Module:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return model.model
    return model


class DecoderAdapter(Adapter):
    """Llama-family decoder LLMs from transformers (KV-cache and layer-K sites)."""

    family = "hf-decoder"
    description = (
        "transformers decoder LLMs (" + ", ".join(sorted(SUPPORTED)) + "); sites kv, decoder"
    )
    sites = frozenset({"kv", "decoder"})

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in SUPPORTED

    def target(self, model: nn.Module) -> Target:
        name = type(model).__name__
        layer_cls, attn_cls = SUPPORTED[name]
        inner = _inner(model)
        cfg = inner.config
        impl = cfg._attn_implementation
        if impl not in IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"{name} uses attn_implementation={impl!r}; the hf-decoder adapter writes "
                f"masks for {', '.join(IMPLEMENTATIONS)} only (load the model with "
                "attn_implementation='sdpa')"
            )
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{name} with bidirectional attention is not supported")
        layers = list(inner.layers[: cfg.num_hidden_layers])
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if type(layer).__name__ != layer_cls or type(attn).__name__ != attn_cls:
                raise UnsupportedModelError(
                    f"{name}: layer {i} is a {type(layer).__name__} with "
                    f"{type(attn).__name__}; the hf-decoder adapter knows {layer_cls} with "
                    f"{attn_cls} only and will not patch this model half-way"
                )
            for attr in ("q_proj", "k_proj", "v_proj", "head_dim", "scaling", "layer_idx"):
                if not hasattr(attn, attr):
                    raise UnsupportedModelError(f"{name}: layer {i} attention lacks {attr!r}")
        rt = _Runtime(model, inner, layers)
        attn_dim = cfg.num_attention_heads * rt.attns[0].head_dim
        cost = CostModel(
            depth=len(layers),
            dim=cfg.hidden_size,
            mlp_dim=cfg.intermediate_size,
            attn_dim=attn_dim,
            mlp_mats=3,
        )
        pre = [(inner, lambda p: rt.model_pre)]
        pre += [(layer, lambda p, i=i: rt.layer_pre(i)) for i, layer in enumerate(layers)]
        post = [(inner, lambda p: rt.model_post)]
        post += [(a, lambda p, i=i: rt.attn_post(i)) for i, a in enumerate(rt.attns)]
        return Target(
            family=self.family,
            blocks=[],  # no block forward is replaced: this adapter works through hooks only
            spec=None,  # type: ignore[arg-type]
            cost=cost,
            n_prefix=0,
            prop_attn=False,
            extra_patches=[(model, ATTR, rt.bind)],
            pre_hooks=pre,
            post_hooks=post,
        )


ADAPTERS.append(DecoderAdapter())


def runtime_of(model: nn.Module) -> _Runtime:
    """The hf-decoder runtime of a patched model (raises if it is not patched)."""
    rt = getattr(model, ATTR, None)
    if rt is None:
        raise ValueError(
            f"{type(model).__name__} is not patched with a kv or decoder method; call "
            "tm.apply(model, method) first"
        )
    return rt


# --------------------------------------------------------------------------------------------
# Chunked prefill (Locret's pipeline), observation and after-the-fact compression
# --------------------------------------------------------------------------------------------


@dataclass
class Prefill:
    """Result of :func:`chunked_prefill`.

    Attributes:
        cache: the (reduced) cache; continue with ``model(..., past_key_values=cache)`` or
            ``model.generate(full_ids, past_key_values=cache, ...)`` while the model is patched.
        logits: ``[B, V]`` next-token logits after the last token (``None`` for a base model).
        peak_bytes: the most bytes the KV cache held at any moment of the prefill.
        budget: ``[B]`` entries per layer kept at the end (``None`` without eviction).
    """

    cache: ReducedCache
    logits: Tensor | None
    peak_bytes: int
    budget: Tensor | None


@torch.inference_mode()
def chunked_prefill(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    chunk: int = 512,
    budget: int | Tensor | None = None,
    window: int = 128,
    cache: ReducedCache | None = None,
    final: bool = True,
    total: int | Tensor | None = None,
) -> Prefill:
    """Prefill ``input_ids`` chunk by chunk, evicting the cache to a fixed budget after each
    chunk (Locret, Huang et al. 2024, arXiv:2410.01805, with a training-free scorer).

    The model must be patched with a KV method (``tm.apply(model, tm.get_method("snapkv",
    ratio=0.75))``); without one the prefill is chunked but nothing is evicted. After each
    chunk's attention at each layer, that layer keeps ``budget`` entries per head: the method's
    best-scored ones, plus (except after the final chunk) the ``window`` most recent tokens,
    Locret's stabilisers. Peak KV memory is therefore ``budget + chunk`` entries per layer.
    Chunks are aligned to the *end* of the context (the first one may be shorter), so that a
    left-padded sample is split exactly as when it runs alone.

    Args:
        input_ids: ``[B, N]`` the context (left padding allowed, with ``attention_mask``).
        chunk: tokens per forward.
        budget: entries kept per layer and head (an int or a ``[B]`` tensor). Default: the
            method's ratio applied to each sample's total real tokens, so the final cache has
            the same size as with a one-shot compression.
        window: recent tokens always kept between chunks (clamped to half the budget).
        cache: continue an earlier (chunked) prefill instead of starting a new one.
        final: the last chunk ends the context (no stabilisers at that eviction).
        total: the full context length when this call is only part of it (for the default
            budget); defaults to what the cache has seen plus ``N``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rt = getattr(model, ATTR, None)
    method = rt.method if rt is not None else None
    if isinstance(method, DecoderMethod) and not method.is_identity:
        raise ValueError("chunked prefill evicts KV-cache entries; the model is patched with "
                         f"a decoder-site method ({method.name})")  # fmt: skip
    if budget is not None and not isinstance(method, KVMethod):
        raise ValueError("a budget needs a KV method: tm.apply(model, <kv method>) first")
    inner = _inner(model)
    b, n = input_ids.shape
    device = input_ids.device
    if cache is None:
        cache = ReducedCache(config=inner.config)
    mask = (
        torch.ones(b, n, dtype=torch.long, device=device)
        if attention_mask is None
        else attention_mask.to(device).long()
    )
    past = cache.orig_valid
    if past is not None and past.shape[1] != cache.seen:
        raise ValueError("the cache's padding record does not match what it has seen")
    real = mask.sum(1) + (past.sum(1) if past is not None else 0)
    caps: dict[int, Tensor] | None = None
    if isinstance(method, KVMethod):
        totals = real if total is None else torch.as_tensor(total, device=device).expand(b)
        caps = {}
        for i in range(rt.depth):
            if budget is not None:
                caps[i] = torch.as_tensor(budget, device=device).expand(b).long()
            else:
                caps[i] = method.keep(totals, i)
        min_cap = int(min(int(c.min()) for c in caps.values()))
        window = min(window, max(min_cap // 2, 0))
    is_causal_lm = type(model).__name__.endswith("ForCausalLM")
    out = None
    # chunks end at the end of the context (the first one may be short): left-padded samples
    # are then split at the same places as when they run alone
    ends = range(n - (n - 1) // chunk * chunk, n + 1, chunk) if n else range(0)
    for e in ends:
        s = max(e - chunk, 0)
        last = final and e == n
        full = mask[:, :e] if past is None else torch.cat([past.long(), mask[:, :e]], 1)
        plan = _Plan(evict=caps is not None, caps=caps, window=0 if last else window)
        token = _PLAN.set(plan)
        try:
            kw: dict[str, Any] = {"logits_to_keep": 1} if is_causal_lm else {}
            out = model(
                input_ids=input_ids[:, s:e],
                attention_mask=full,
                past_key_values=cache,
                use_cache=True,
                **kw,
            )
        finally:
            _PLAN.reset(token)
    logits = out.logits[:, -1] if out is not None and is_causal_lm else None
    cache.peak_bytes = max(cache.peak_bytes, cache.nbytes)
    return Prefill(
        cache=cache,
        logits=logits,
        peak_bytes=cache.peak_bytes,
        budget=None if caps is None else caps[0],
    )


@contextlib.contextmanager
def observe(fn: Callable[[KVContext], None], evict: bool | None = None) -> Iterator[None]:
    """Call ``fn(ctx)`` with every full-attention layer's :class:`KVContext` after its
    attention, in forwards of a patched model inside the block (analysis, benchmarks).

    ``evict=False`` keeps the cache whole while the patched method still tracks its statistics
    (e.g. H2O's accumulated attention) across the forwards of a multi-part prefill.
    """
    token = _OBSERVER.set(fn)
    plan_token = _PLAN.set(_Plan(evict=False)) if evict is False else None
    try:
        yield
    finally:
        if plan_token is not None:
            _PLAN.reset(plan_token)
        _OBSERVER.reset(token)


def compress(cache: ReducedCache, contexts: dict[int, KVContext], method: KVMethod) -> ReducedCache:
    """Evict ``cache`` (in place) with ``method``, from contexts recorded by :func:`observe`.

    This is exactly what a patched forward does after its attention at each layer, split in
    two so that one prefill can be compressed by several methods and ratios (benchmarks):
    ``compress(fork_cache(full), contexts, tm.get_method("snapkv", ratio=0.75))``.
    """
    for i, ctx in contexts.items():
        if cache.stored(i) != ctx.length:
            raise ValueError(f"layer {i}: the cache no longer matches the recorded context")
        if method.stateful and method.name not in ctx.stats:
            ctx = copy.copy(ctx)
            ctx.stats = {**ctx.stats, **method.update_stats(ctx)}
        counts = ctx.counts
        keep = method.keep(counts, i)
        if bool((keep >= counts).all()):
            continue
        index, slot_valid = method.select(ctx, keep)
        _evict(cache, i, ctx, index, slot_valid)
    return cache
