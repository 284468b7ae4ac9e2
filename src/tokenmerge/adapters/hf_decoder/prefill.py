"""Chunked prefill (Locret's pipeline), observation and after-the-fact compression."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core.budget import as_int, show_value
from ...methods.decoder import DecoderMethod
from ...methods.kv import KVContext, KVMethod
from .adapter import ATTR, _inner
from .cache import ReducedCache, _evict
from .compat import cache_arg
from .forward import _OBSERVER, _PLAN, _Plan
from .kvsite import hold_budget
from .reconstruct import reconstruction_scores, with_scores


def _budget(value: Any, batch: int, device: torch.device) -> Tensor:
    """A positive budget per sample, ``[B]`` long."""
    if isinstance(value, Tensor) and value.dim() == 1:
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(
                f"budget must be an int >= 1 or a [B] integer tensor (all >= 1), got "
                f"{show_value(value)} of dtype {value.dtype}"
            )
        if value.shape[0] not in (1, batch):
            raise ValueError(f"budget has {value.shape[0]} entries for a batch of {batch}")
        if value.numel() and int(value.min()) < 1:
            raise ValueError(f"budget must be >= 1 for every sample; got {value.tolist()}")
        return value.to(device=device, dtype=torch.long).expand(batch)
    n = as_int(value, "budget", minimum=1, hint=" (or pass a [B] integer tensor, all >= 1)")
    return torch.full((batch,), n, dtype=torch.long, device=device)


@dataclass
class Prefill:
    """Result of :func:`chunked_prefill`.

    Attributes:
        cache: the (reduced) cache; continue with ``model(..., **cache_kw(model, cache))`` or
            ``model.generate(full_ids, **cache_kw(model, cache), ...)`` while the model is patched.
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
        chunk: tokens per forward (a positive integer).
        budget: entries kept per layer and head (a positive integer or a ``[B]`` integer
            tensor). Default: the method's ratio applied to each sample's total real tokens,
            so the final cache has the same size as with a one-shot compression.
        window: recent tokens always kept between chunks (a non-negative integer, clamped to
            half the budget).
        cache: continue an earlier (chunked) prefill instead of starting a new one.
        final: the last chunk ends the context (no stabilisers at that eviction).
        total: the full context length when this call is only part of it (for the default
            budget); defaults to what the cache has seen plus ``N``.

    Raises:
        TypeError, ValueError: before any forward, for a ``chunk``, ``budget`` or ``window``
            that is not an integer of the accepted kind and range.
    """
    chunk = as_int(chunk, "chunk", minimum=1)
    window = as_int(window, "window", minimum=0)
    b, n = input_ids.shape
    device = input_ids.device
    caps_budget = None if budget is None else _budget(budget, b, device)
    rt = getattr(model, ATTR, None)
    method = rt.method if rt is not None else None
    if isinstance(method, DecoderMethod) and not method.is_identity:
        raise ValueError("chunked prefill evicts KV-cache entries; the model is patched with "
                         f"a decoder-site method ({method.name})")  # fmt: skip
    if budget is not None and not isinstance(method, KVMethod):
        raise ValueError("a budget needs a KV method: tm.apply(model, <kv method>) first")
    if isinstance(method, KVMethod) and (method.reconstructs or method.ragged):
        why = (
            "scores the context with forwards after the whole prefill"
            if method.reconstructs
            else "leaves heads with different numbers of entries, which cannot be evicted again"
        )
        raise ValueError(
            f"chunked prefill evicts after every chunk, but {method.name} {why}; use a "
            "one-shot prefill (model(ids, use_cache=True) or generate) with this method"
        )
    inner = _inner(model)
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
            caps[i] = caps_budget if caps_budget is not None else method.keep(totals, i, rt.depth)
        if b:
            min_cap = int(torch.stack([c.min() for c in caps.values()]).min())
            window = min(window, max(min_cap // 2, 0))
    is_causal_lm = type(model).__name__.endswith("ForCausalLM")
    arg = rt.cache_arg if rt is not None else cache_arg(model)
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
                use_cache=True,
                **{arg: cache},
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


def compress(
    cache: ReducedCache,
    contexts: dict[int, KVContext],
    method: KVMethod,
    *,
    model: nn.Module | None = None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> ReducedCache:
    """Evict ``cache`` (in place) with ``method``, from contexts recorded by :func:`observe`.

    This is exactly what a patched forward does after its attention at each layer, split in
    two so that one prefill can be compressed by several methods and ratios (benchmarks):
    ``compress(fork_cache(full), contexts, tm.get_method("snapkv", ratio=0.75))``.

    A method that scores with forwards after the prefill (KVzip) also needs the ``model``
    (patched with any KV method) and the prefill's ``input_ids`` (and ``attention_mask`` for
    left padding, ``position_ids`` if the prefill was given them); those forwards run on
    forks, so ``cache`` only loses entries.
    """
    scores = None
    if method.reconstructs:
        rt = getattr(model, ATTR, None) if model is not None else None
        if rt is None or input_ids is None:
            raise ValueError(
                f"{method.name} scores with forwards after the prefill: pass model= (patched "
                "with tm.apply) and the prefill's input_ids= to compress"
            )
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.to(input_ids.device).bool()
        )
        scores = reconstruction_scores(rt, cache, (input_ids, None), valid, method, position_ids)
    depth = len(cache.layers)
    ctxs, keeps = {}, {}
    for i, ctx in contexts.items():
        if cache.stored(i) != ctx.length:
            raise ValueError(f"layer {i}: the cache no longer matches the recorded context")
        if method.stateful and method.name not in ctx.stats:
            ctx = copy.copy(ctx)
            ctx.stats = {**ctx.stats, **method.update_stats(ctx)}
        if scores is not None:
            ctx = with_scores(copy.copy(ctx), scores)
        counts = ctx.counts
        keep = method.keep(counts, i, depth)
        hold_budget(cache, method, i, counts, keep, depth)
        if method.shares_layers or not bool((keep >= counts).all()):
            ctxs[i], keeps[i] = ctx, keep
    for i, (index, slot_valid) in method.select_layers(ctxs, keeps).items():
        _evict(cache, i, ctxs[i], index, slot_valid)
    return cache
