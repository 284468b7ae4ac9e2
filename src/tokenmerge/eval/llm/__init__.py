"""The LLM benchmark: KV-cache and layer-K methods on a decoder LLM, always against the
uncompressed model in the same run.

**Trials** (:mod:`.trials`). Every trial is a user turn of the model's chat template holding a
haystack of real English text (Austen, Moby-Dick, the Jargon File, the Python tutorial;
:mod:`tokenmerge.eval.corpora`) of ``L`` tokens with a pass key sentence at a depth in
0.1-0.9, followed by the question. As in kvpress's pipeline, the template is rendered around
a placeholder and split there: the *context* (template prefix + haystack) is compressed
before the question is seen; the *question* (question text, end of the user turn, assistant
start and the answer prefix ``"The pass key is"``) is fed after it. ``trials`` trials per
length (20 by default), the corpora in turn.

**Measured** per method, budget and prefill mode (:mod:`.measure`):

- **needle accuracy** ± its standard error ``sqrt(p(1-p)/n)``, overall and per length,
  query-agnostic (the context is compressed alone; the question attends to the compressed
  cache at its original positions) and query-aware (the question but its last token is part
  of the compressed prefill). A trial is correct when greedy decoding (up to
  ``max_new_tokens``, one forward per token on a fork of the cache) contains the key.
- **perplexity ratio**: perplexity of the real continuation given the compressed context
  over the uncompressed model's on the same tokens, pooled over trials (± a standard error
  over trials); query-agnostic (the continuation is fed after the compressed context) and
  query-aware (its first ``PPL_PREFIX`` tokens are prefilled and compressed with the
  context). Both score the continuation after its first ``PPL_PREFIX + 1`` tokens. For
  ``ppl_check`` trials per one-shot configuration the ratio is recomputed independently
  (:mod:`.check`: the unpatched model on the whole sequence under an explicit per-layer,
  per-head mask of the entries kept) and the largest difference is reported.
- **cost**: KV bytes (final, and peak during the prefill) over the uncompressed cache's; the
  prefill time ratio of the real patched prefill, interleaved with the unpatched one (median
  and spread of ``timing_runs`` pairs); the forwards a method runs after the prefill
  (``extra_forwards``: KVzip's reconstruction); decode throughput ratio.

**Prefill modes** for KV methods: ``oneshot`` (each layer is compressed right after its
attention in a single prefill) and ``chunked``
(:func:`~tokenmerge.adapters.hf_decoder.chunked_prefill`: ``chunk`` tokens at a time,
evicted to the final budget after every chunk, with ``window`` stabilising tokens; not for
KVzip and AdaKV, which it refuses). Decoder-site methods (FastV, AIM, HoliTom) reduce the
span of the context at layer K in a single prefill.

**How the cost is kept down** (:mod:`.runner`; the results are those of running each method
on its own, up to floating-point rounding): one-shot compression does not change the
prefill's computation, so each trial is prefilled once: the context minus its last ``tail``
tokens, then those tokens alone or with each mode's suffix (so that every scorer's query
window sees what one prefill would show it), with every layer's scoring context recorded
(:func:`~tokenmerge.adapters.hf_decoder.observe`; H2O's statistics are accumulated over both
forwards). Every one-shot method and ratio compresses a copy of that cache with the code a
patched forward runs (:func:`~tokenmerge.adapters.hf_decoder.compress`; the tests check they
are identical), and is measured with the model patched with that method (TOVA keeps evicting
while it decodes). KVzip's reconstruction scores do not depend on the ratio: they are
computed once per trial and mode. Chunked prefills share every chunk but the last between
the modes. Timings come from one context, apart from the trials. ``workers`` forked
processes, or the ranks of a ``torchrun`` / ``accelerate launch`` run, can share the trials
(:mod:`.parallel`); the timings then run alone afterwards (on rank 0).
"""

from .bench import run, summarize
from .check import kept_mask, reference_nll
from .cli import QUICK, cli_main
from .measure import Acc, continuation_nll, greedy_answer, ppl_ratio, proportion
from .parallel import run_trials
from .report import markdown, winners
from .runner import PPL_PREFIX, TASKS, LLMBenchConfig, Runner, planned_steps, ratio_of
from .trials import ANSWER_PREFIX, NEEDLE, QUESTION, Trial, chat_split, ids_of, make_trials

__all__ = [
    "ANSWER_PREFIX",
    "NEEDLE",
    "PPL_PREFIX",
    "QUESTION",
    "QUICK",
    "TASKS",
    "Acc",
    "LLMBenchConfig",
    "Runner",
    "Trial",
    "chat_split",
    "cli_main",
    "continuation_nll",
    "greedy_answer",
    "ids_of",
    "kept_mask",
    "make_trials",
    "markdown",
    "planned_steps",
    "ppl_ratio",
    "proportion",
    "ratio_of",
    "reference_nll",
    "run",
    "run_trials",
    "summarize",
    "winners",
]
