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

Framework versions. transformers 5.24 renamed the cache argument ``past_key_values`` to
``cache``; the adapter reads the names from the patched forwards' signatures at patch time
(:mod:`.compat`), accepts a cache passed under either name, and reads outputs with
:func:`cache_of`. Every forward that schedules a reduction checks that it happened and raises
:class:`~tokenmerge.adapters.base.ReductionNotApplied` otherwise (see :mod:`.runtime`).

Labels. A decoder-site method shortens the sequence, so with ``labels=`` the loss is computed
on the kept slots: slot ``s`` at original position ``p_s`` predicts the label of ``p_s + 1``
(passed as ``shift_labels`` to the model's own ``loss_function``).

Usage::

    tm.apply(model, tm.get_method("snapkv", ratio=0.75))      # 4x smaller KV cache
    out = model.generate(ids, attention_mask=mask, max_new_tokens=32)   # compressed prefill

    pre = chunked_prefill(model, context_ids, chunk=512)        # query-agnostic, chunked
    out = model.generate(torch.cat([context_ids, question_ids], 1),
                         **cache_kw(model, pre.cache), max_new_tokens=32)

    tm.apply(model, tm.get_method("fastv", ratio=0.5, layer=2))  # layer-K pruning
"""

from .adapter import ATTR, IMPLEMENTATIONS, SUPPORTED, DecoderAdapter, runtime_of
from .cache import ReducedCache, fork_cache, kv_bytes
from .compat import CACHE_NAMES, Signature, cache_arg, cache_kw, cache_of
from .prefill import Prefill, chunked_prefill, compress, observe

__all__ = [
    "ATTR",
    "CACHE_NAMES",
    "IMPLEMENTATIONS",
    "SUPPORTED",
    "DecoderAdapter",
    "Prefill",
    "ReducedCache",
    "Signature",
    "cache_arg",
    "cache_kw",
    "cache_of",
    "chunked_prefill",
    "compress",
    "fork_cache",
    "kv_bytes",
    "observe",
    "runtime_of",
]
