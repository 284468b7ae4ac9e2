"""The KV-cache site of the decoder runtime: what happens right after each layer's attention.

After a layer's attention has written its keys and values, :meth:`_KVSite._after_attention`
keeps the cache's bookkeeping aligned (original index and running statistics of every entry),
builds the layer's :class:`~tokenmerge.methods.kv.KVContext` when a method or an observer
needs it, and evicts that layer at once (:meth:`_KVSite._evict_layer`), so that peak memory
falls with the final size. Two kinds of method change *when*:

- a method that ``reconstructs`` (KVzip) needs forwards after the whole prefill: the layer's
  context is kept and the eviction runs once those forwards have scored it
  (:mod:`.reconstruct`);
- a method that evicts while decoding (TOVA) gets a plan in every later forward too, holding
  each layer at the budget its prefill left.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...methods.kv import KVContext, KVMethod
from .cache import ReducedCache, _evict
from .forward import _OBSERVER, _Forward, _Plan
from .ops import _project, _project_raw


def hold_budget(
    cache: ReducedCache, kv: KVMethod, i: int, counts: Tensor, keep: Tensor, depth: int
) -> None:
    """Record the budget later forwards hold layer ``i`` at, for a method that evicts while
    decoding (TOVA): the prefill's ``keep``, except for layers whose ratio is 0 and samples
    shorter than ``min_tokens``, which stay whole."""
    if not kv.decode_evict or kv.ratio_at(i, depth) == 0.0:
        return
    whole = torch.full_like(keep, torch.iinfo(keep.dtype).max)
    cache.budgets[i] = torch.where(counts < kv.min_tokens, whole, keep)


class _KVSite:
    """Mixin of :class:`~.runtime._Runtime`: the KV-cache site."""

    inner: nn.Module
    config: Any
    depth: int
    kv: KVMethod | None

    def _fail(self, run: _Forward, what: str) -> Exception: ...

    def _release(self, run: _Forward) -> None: ...

    def _after_attention(self, i: int, attn: nn.Module, run: _Forward, kwargs: dict) -> None:
        cache = run.cache
        layer = cache.layers[i]
        n = cache.stored(i)
        n_new = run.rep.shape[1]
        if run.hidden_reduced or i in cache.index:
            old = cache.index.get(i)
            hk = layer.keys.shape[1]
            new_idx = run.rep.masked_fill(~run.valid, -1) if run.padded else run.rep
            new = new_idx[:, None, :].expand(-1, hk, -1)
            if old is None:
                n_old = max(n - n_new, 0)  # a sliding layer may have dropped old entries
                ar = torch.arange(run.seen - n_old, run.seen, device=new.device)
                old = ar.expand(new.shape[0], hk, n_old)
            cache.index[i] = torch.cat([old, new], -1)[..., -n:] if n else new[..., :0]
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
        plan = run.plan
        if kv is not None and plan.caps is not None and i not in plan.caps:
            return  # a layer its prefill left whole (decode eviction)
        ctx = self._context(i, attn, run, kwargs)
        if kv is not None and plan.track:
            updates = kv.update_stats(ctx)
            if updates:
                ctx.stats.update(updates)
                cache.stats[i] = dict(ctx.stats)
        if observer is not None:
            observer(ctx)
        if kv is None or not plan.evict:
            return
        if kv.reconstructs and plan.caps is None:
            run.deferred[i] = ctx  # scored by the forwards after the prefill (.reconstruct)
            return
        self._evict_layer(i, ctx, run, plan)

    def _evict_layer(self, i: int, ctx: KVContext, run: _Forward, plan: _Plan) -> None:
        """Evict layer ``i`` to its budget with the patched method (and check it did)."""
        self._evict_layers({i: ctx}, run, plan)

    def _evict_layers(self, ctxs: dict[int, KVContext], run: _Forward, plan: _Plan) -> None:
        """Evict layers ``ctxs`` together (:meth:`KVMethod.select_layers`: a method may share
        one budget across them) and check that they kept what their budgets allow: each
        layer its own, or, for a method that :attr:`~KVMethod.shares_layers`, all together."""
        kv, cache = self.kv, run.cache
        keeps: dict[int, Tensor] = {}
        for i, ctx in ctxs.items():
            counts = ctx.counts
            if plan.caps is not None:  # chunked prefill, or a decoding step held at its budget
                keeps[i] = torch.minimum(plan.caps[i].to(counts.device), counts)
            else:
                keeps[i] = kv.keep(counts, i, self.depth)
                hold_budget(cache, kv, i, counts, keeps[i], self.depth)
        shared = kv.shares_layers
        uniform: dict[int, bool] = {}
        for i, k in list(keeps.items()):
            if not k.numel():
                del keeps[i]
                continue
            # one host read: whether anything is removed (else the layer is skipped, unless
            # it shares its budget), and whether every sample keeps as many (no empty slot)
            done, same = torch.stack([(k >= ctxs[i].counts).all(), (k == k.max()).all()]).tolist()
            if done and not shared:
                del keeps[i]
            uniform[i] = same
        if not keeps:
            return
        forced = {
            i: ctxs[i].recent(min(plan.window, ctxs[i].length)) if plan.window > 0 else None
            for i in keeps
        }
        chosen = kv.select_layers({i: ctxs[i] for i in keeps}, keeps, forced)
        got_all, want_all = 0, 0
        for i, (index, slot_valid) in chosen.items():
            ragged = slot_valid.dim() == 3
            keep = keeps[i]
            _evict(cache, i, ctxs[i], index, slot_valid, holes=ragged or not uniform[i])
            cache.peak_bytes = max(cache.peak_bytes, cache.nbytes)
            run.evicted[i] = index.shape[-1]
            heads = index.shape[1]
            got = (slot_valid if ragged else slot_valid[:, None]).sum((1, 2))
            want = keep * (heads if ragged else 1)  # keep is at most the real entries
            if shared:
                got_all, want_all = got_all + got, want_all + want
            else:
                self._check_kept(run, f"layer {i}", got, want)
        if shared:
            self._check_kept(run, f"layers {sorted(chosen)}", got_all, want_all)

    @staticmethod
    def _check_kept(run: _Forward, where: str, got: Tensor, want: Tensor) -> None:
        run.checks.append(
            (
                (got == want).all(),
                lambda: f"{where} kept {got.tolist()} entries, budget {want.tolist()}",
            )
        )

    def _context(self, i: int, attn: nn.Module, run: _Forward, kwargs: dict) -> KVContext:
        cache = run.cache
        if i in cache.ragged:
            self._release(run)
            raise ValueError(
                f"layer {i} of this cache was compressed by a method whose heads keep different "
                "numbers of entries (AdaKV, KVzip); it cannot be scored or evicted again (chunked "
                "prefill, decode eviction, observe): use a one-shot prefill, or a method with "
                "equal per-head budgets"
            )
        layer = cache.layers[i]
        n_new = run.rep.shape[1]
        index = cache.layer_index(i)
        valid = cache.valid_of(index[:, 0])
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]

        def query_fn(rows: slice) -> Tensor:
            return _project(attn, "q", h[:, rows], cos[:, rows], sin[:, rows])

        def raw_query_fn(rows: slice) -> Tensor:
            return _project_raw(attn, "q", h[:, rows])

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
            raw_query_fn=raw_query_fn,
            rope_fn=self._rope_fn(i, layer.keys),
            query_rope=(cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)),
        )

    def _rope_fn(self, i: int, like: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]] | None:
        """Layer ``i``'s rotary embedding at given positions, from the model's own module."""
        rot = getattr(self.inner, "rotary_emb", None)
        if rot is None:
            return None
        extra: tuple = ()
        if "layer_type" in inspect.signature(rot.forward).parameters:
            extra = (self.config.layer_types[i],)  # Gemma 3: local and global rotations

        def fn(positions: Tensor) -> tuple[Tensor, Tensor]:
            cos, sin = rot(like, positions.to(like.device)[None], *extra)
            return cos[0], sin[0]

        return fn
