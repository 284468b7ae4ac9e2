"""KV-cache methods: which cached keys and values a decoder LLM keeps (the ``"kv"`` site).

A KV method scores every entry of one layer's cache and keeps the best ones. The adapter
(:mod:`tokenmerge.adapters.hf_decoder`) calls it right after that layer's attention, so the
prefill itself is exact and each layer's cache is shrunk as soon as it is written (peak memory
falls as well as the final size). Scores are ``[B, H_kv, L]``: one per KV head and entry, so
every scorer works with grouped-query attention (query heads are averaged within their group).

Budgets. ``ratio`` is the fraction of each sequence's entries that is *removed* (kvpress's
``compression_ratio``): ``0.5`` is 2x compression, ``0.75`` is 4x, ``0.875`` is 8x. It may be
a tuple with one value per layer. Each sample keeps ``round(n_b (1 - ratio))`` of its own ``n_b``
real entries, so padding never counts and never survives. ``per_head=True`` (the default, as in
kvpress and SnapKV) lets every KV head keep its own entries, with the same number per head;
``False`` averages the scores over heads and keeps one set for all of them.
``layer_budget="pyramid"`` spreads the same total over the layers in PyramidKV's shape
(:mod:`.pyramid`), for any scorer.

Scorers (higher = keep):

======================  ================================================================  =========
name                    score of entry ``j``                                              needs
======================  ================================================================  =========
``streaming_llm``       ``+inf`` for the first ``sinks`` tokens, else the position        nothing
``snapkv``              pooled attention from the last ``window`` queries                 queries
``h2o``                 attention accumulated over every query so far (+ recent half)     queries
``knorm``               ``-||k_j||``                                                      keys
``random_kv``           a hash of (seed, layer, head, position)                           nothing
``keydiff``             ``-cos(k_j, mean_i k_i/||k_i||)``                                 keys
``expected_attention``  expected attention of future queries (Gaussian, RoPE-averaged)    queries
``tova``                the current query's head-averaged attention, also while decoding  queries
``kvzip``               most attention received while the model repeats the context       extra
                        (forwards after the prefill)                                      forwards
======================  ================================================================  =========

Wrapper: ``adakv`` shares each layer's budget across its heads by a global top-k over any
scorer's scores (heads keep different numbers of entries; attention masks the rest per head).

Attention for scoring is computed explicitly (``softmax(q Kᵀ/√d)``) at the scored layer only,
for the queries a scorer asks for, in query blocks that skip the causal future
(:meth:`KVContext.attention_blocks`); the model's own attention keeps its fused kernel. Kept keys
keep the RoPE phase of their original position (no re-rotation), and later tokens continue at
their original positions.

Layers with a sliding window (Mistral, Gemma 3's local layers) are compressed too when they
hold the whole prefill; when the prefill is longer than the window they already hold only the
window and are left alone.
"""

from .adakv import AdaKV
from .base import RECENCY, RECONSTRUCTION, KVContext, KVMethod, QueryFn, select_entries
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KNorm
from .kvzip import KVzip, kvzip_prompt
from .random_kv import RandomKV, position_hash
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

#: the scorers in the benchmark's order (every registered KV method; a test checks)
KV_SCORERS: tuple[str, ...] = (
    "streaming_llm",
    "snapkv",
    "h2o",
    "knorm",
    "random_kv",
    "keydiff",
    "expected_attention",
    "tova",
    "kvzip",
    "adakv",
)

__all__ = [
    "H2O",
    "KV_SCORERS",
    "RECENCY",
    "RECONSTRUCTION",
    "TOVA",
    "AdaKV",
    "ExpectedAttention",
    "KNorm",
    "KVContext",
    "KVMethod",
    "KVzip",
    "KeyDiff",
    "QueryFn",
    "RandomKV",
    "SnapKV",
    "StreamingLLM",
    "kvzip_prompt",
    "position_hash",
    "select_entries",
]
