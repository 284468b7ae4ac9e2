"""Scoring by forwards after the prefill (KVzip's context reconstruction).

A method that ``reconstructs`` scores a layer's entries only once the whole context is
cached: the model is fed its reconstruction prompt followed by the context again, chunk by
chunk, each chunk on a fork of the full cache (so nothing is added to it), and every entry
scores the most attention it receives from those queries. The prefill's eviction waits for
these forwards (:func:`score_by_reconstruction`); :func:`~.prefill.compress` runs the same
code on a recorded prefill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...methods.kv import RECENCY, RECONSTRUCTION, KVContext, KVMethod
from .cache import ReducedCache, fork_cache
from .forward import _OBSERVER, _PLAN, _Forward, _Plan

if TYPE_CHECKING:
    from .runtime import _Runtime


@torch.inference_mode()
def reconstruction_scores(
    rt: _Runtime,
    cache: ReducedCache,
    inputs: tuple[Tensor | None, Tensor | None],
    input_valid: Tensor,
    method: KVMethod,
    position_ids: Tensor | None = None,
) -> dict[int, Tensor]:
    """``{layer: [B, H_kv, n]}``: the most attention each of the ``n`` context entries
    receives from the reconstruction forwards of ``method`` (``method.reconstruction_score``).

    Args:
        rt: the runtime of the patched model.
        cache: the prefill's full cache (left untouched: every forward runs on a fork).
        inputs: the prefill's ``(input_ids, inputs_embeds)``, one of them set, ``[B, n, ...]``.
        input_valid: ``[B, n]`` which context tokens are real.
        position_ids: ``[B, n]`` the prefill's positions, if the caller passed them (else
            the model numbered the tokens ``0..n-1``).

    The real tokens of each forward continue right after the last real position of the
    context, and a chunk's padding (left padding, in the first chunk) is moved to its end,
    so that a left-padded sample sees the same positions and sliding windows as when it runs
    alone.
    """
    method = method.scoring  # a wrapper (adakv) selects by its scorer's reconstruction
    ids, emb = inputs
    embed = rt.inner.get_input_embeddings()
    x = emb if emb is not None else embed(ids)
    b, n = x.shape[:2]
    device = x.device
    prompt = torch.tensor(method.prompt, dtype=torch.long, device=device)
    p_emb = embed(prompt)[None].expand(b, -1, -1).to(x.dtype) if prompt.numel() else x[:, :0]
    past = cache.orig_valid if cache.orig_valid is not None else input_valid
    if position_ids is None:
        nxt = torch.full((b,), n, dtype=torch.long, device=device)
    else:
        pos = position_ids.to(device).expand(b, n).masked_fill(~input_valid, -1)
        nxt = pos.amax(1) + 1
    scores: dict[int, Tensor] = {}

    def collect(ctx: KVContext) -> None:
        s = method.reconstruction_score(ctx)  # [B, H_kv, L] over every stored entry
        idx = ctx.index
        ctx_entry = (idx >= 0) & (idx < n)  # entries of the context, by original index
        full = s.new_zeros(b, s.shape[1], n).scatter_reduce(
            2, idx.clamp(0, n - 1), s.masked_fill(~ctx_entry, 0.0), "amax"
        )
        prev = scores.get(ctx.layer)
        scores[ctx.layer] = full if prev is None else torch.maximum(prev, full)

    outer = rt._outer.get()
    outer_run = outer.run if outer is not None else None
    ones = torch.ones(b, prompt.numel(), dtype=torch.long, device=device)
    try:
        for s, e in method.chunks(n):
            real = input_valid[:, s:e]
            perm = (~real).long().argsort(dim=1, stable=True)  # real tokens first, padding last
            part = x[:, s:e].gather(1, perm[..., None].expand(-1, -1, x.shape[-1]))
            inp = torch.cat([p_emb, part], 1)
            new = torch.cat([ones.bool(), real.gather(1, perm)], 1)
            mask = torch.cat([past.long(), new.long()], 1)
            pos = (nxt[:, None] + new.long().cumsum(1) - 1).clamp_min(0)
            plan_token = _PLAN.set(_Plan(evict=False, track=False))
            obs_token = _OBSERVER.set(collect)
            try:
                rt.inner(
                    inputs_embeds=inp,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=True,
                    **{rt.model_sig.cache: fork_cache(cache)},
                )
            finally:
                _OBSERVER.reset(obs_token)
                _PLAN.reset(plan_token)
    finally:
        if outer is not None:
            outer.run = outer_run  # the nested forwards are not the caller's
    return scores


def with_scores(ctx: KVContext, scores: dict[int, Tensor]) -> KVContext:
    """``ctx`` with its entries' reconstruction scores (``scores[layer]`` by original
    index), or, at a layer the reconstruction did not see, their recency (:data:`RECENCY`)."""
    by_index = scores.get(ctx.layer)
    key = RECONSTRUCTION if by_index is not None else RECENCY
    by_index = by_index if by_index is not None else _recency(ctx)
    s = by_index.gather(2, ctx.index.clamp_min(0)).masked_fill(ctx.index < 0, 0.0)
    ctx.stats = {**ctx.stats, key: s}
    return ctx


def _recency(ctx: KVContext) -> Tensor:
    """Scores by original index (a sliding layer the reconstruction could not see keeps its
    most recent entries, the only ones its window lets later tokens attend to)."""
    n = int(ctx.index.max()) + 1 if ctx.index.numel() else 0
    b, h = ctx.index.shape[:2]
    return torch.arange(n, device=ctx.index.device, dtype=torch.float32).expand(b, h, n)


def score_by_reconstruction(rt: _Runtime, run: _Forward) -> None:
    """The deferred eviction of a prefill: score by reconstruction, then evict every layer."""
    kv = rt.kv
    assert kv is not None and run.inputs is not None and run.plan is not None
    scores = reconstruction_scores(
        rt, run.cache, run.inputs, run.input_valid, kv, position_ids=run.position_ids
    )
    ctxs = {i: with_scores(ctx, scores) for i, ctx in run.deferred.items()}
    rt._evict_layers(ctxs, run, run.plan)
    run.deferred.clear()
