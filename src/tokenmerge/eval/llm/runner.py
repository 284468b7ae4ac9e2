"""The benchmark's run: one recorded prefill per trial shared by every one-shot method and
ratio, chunked and decoder-site prefills, timings and memory (see the package docstring)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...adapters import hf_decoder as hd
from ...adapters.hf_decoder.reconstruct import reconstruction_scores, with_scores
from ...api import patched
from ...methods import REGISTRY, get_method
from ...methods.base import Method
from ...methods.decoder import DecoderMethod
from ...methods.kv import KV_SCORERS, KVContext, KVMethod
from .check import check_supported, kept_fraction, kept_mask, reference_nll
from .measure import Acc, continuation_nll, greedy_answer, spread_of, stop_ids
from .trials import Trial

TASKS = frozenset({"needle", "ppl", "memory", "speed"})
#: continuation tokens prefilled in the query-aware perplexity mode
PPL_PREFIX = 16
Recorded = dict[str, tuple[Any, dict[int, KVContext], Tensor]]


@dataclass
class LLMBenchConfig:
    """What to run (see the package docstring)."""

    model: str = "smollm2-135m"
    methods: Sequence[str] = KV_SCORERS
    factors: Sequence[float] = (2.0, 4.0, 8.0)
    #: per-method factors, instead of ``factors`` for those methods (``--budgets-for``)
    method_factors: dict[str, Sequence[float]] = field(default_factory=dict)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    corpora: Sequence[str] = ("austen", "mobydick", "jargon", "pydocs")
    lengths: Sequence[int] = (1024, 2048)
    #: needle trials per length (depths spread over 0.1-0.9, corpora in turn)
    trials: int = 20
    continuation: int = 128
    #: greedy answer tokens
    max_new_tokens: int = 12
    #: trials per one-shot method and ratio whose perplexity is recomputed independently
    ppl_check: int = 2
    chunk: int = 256
    window: int = 64
    chunked: bool = True
    #: also measure the query-aware modes (the question or the continuation's start is
    #: compressed with the context); ``False`` measures the query-agnostic mode alone, at
    #: about half the cost
    aware: bool = True
    memory_lengths: Sequence[int] = (1024, 2048, 4096)
    memory_budget: int = 256
    speed_length: int = 1024
    decode_tokens: int = 32
    timing_runs: int = 5
    #: processes the trials run on (:mod:`.parallel`), each with an equal share of the threads
    workers: int = 1
    seed: int = 0
    tasks: frozenset[str] = TASKS


def factors_of(cfg: LLMBenchConfig, name: str) -> Sequence[float]:
    """The compression factors method ``name`` runs at."""
    return cfg.method_factors.get(name, cfg.factors)


def all_factors(cfg: LLMBenchConfig) -> list[float]:
    """Every factor some method runs at, in increasing order."""
    return sorted({f for m in cfg.methods for f in factors_of(cfg, m)})


def ratio_of(factor: float) -> float:
    """Compression factor (2 = 2x) -> fraction removed."""
    return 1.0 - 1.0 / factor


def make_method(cfg: LLMBenchConfig, name: str, factor: float, **extra: Any) -> Method:
    """``name`` at compression ``factor`` with the configured hyper-parameters."""
    return get_method(name, ratio=ratio_of(factor), **{**cfg.method_params.get(name, {}), **extra})


def chunkable(method: Method) -> bool:
    """Chunked prefill refuses methods that score after the whole prefill or leave ragged
    heads (KVzip, AdaKV)."""
    return not (method.reconstructs or method.ragged)


def planned_steps(cfg: LLMBenchConfig) -> int:
    """Progress steps of a run (for the progress bar)."""
    # configurations per method: its factors, twice for a KV method that also runs chunked
    runs = 0
    for m in cfg.methods:
        twice = issubclass(REGISTRY[m], KVMethod) and cfg.chunked
        runs += len(factors_of(cfg, m)) * (
            2 if twice and chunkable(make_method(cfg, m, 2.0)) else 1
        )
    total = 0
    if cfg.tasks & {"needle", "ppl"}:
        total += (1 + runs) * len(cfg.lengths) * cfg.trials
    if "speed" in cfg.tasks:
        total += runs + len(all_factors(cfg))
    return total + len(cfg.memory_lengths) * ("memory" in cfg.tasks)


@functools.cache
def _prescored_type(cls: type[KVMethod]) -> type[KVMethod]:
    return type(cls.__name__, (cls,), {"reconstructs": False, "__module__": __name__})


def _prescored(method: KVMethod) -> KVMethod:
    """``method`` (KVzip, or AdaKV over it) selecting by reconstruction scores already put in
    each context's stats (:func:`~tokenmerge.adapters.hf_decoder.reconstruct.with_scores`),
    so that :func:`~tokenmerge.adapters.hf_decoder.compress` runs no forwards: the scores do
    not depend on the ratio, so one reconstruction serves every ratio of a trial (a test
    checks the result is identical to ``compress(..., model=, input_ids=)``)."""
    out = copy.copy(method)
    out.__class__ = _prescored_type(type(method))
    return out


class Runner:
    """Runs the trials, accumulating one :class:`Acc` per (method, factor, prefill mode)."""

    def __init__(self, cfg: LLMBenchConfig, model: nn.Module, tok: Any, tick: Callable) -> None:
        self.cfg, self.model, self.tok, self.tick = cfg, model, tok, tick
        self.kv_methods = [m for m in cfg.methods if issubclass(REGISTRY[m], KVMethod)]
        self.dec_methods = [m for m in cfg.methods if issubclass(REGISTRY[m], DecoderMethod)]
        self.accs: dict[tuple[str, float, str], Acc] = {}
        self.base = Acc()
        self.checks: list[dict[str, Any]] = []
        self.stop = stop_ids(model, tok)
        self.tracker, self.tail = self._plan()
        if cfg.ppl_check and "ppl" in cfg.tasks and self.kv_methods:
            check_supported(model)

    def method(self, name: str, factor: float, **extra: Any) -> Any:
        return make_method(self.cfg, name, factor, **extra)

    def acc(self, name: str, factor: float, mode: str) -> Acc:
        return self.accs.setdefault((name, factor, mode), Acc())

    def _plan(self) -> tuple[KVMethod, int]:
        """The recorded prefill: the method it is patched with, and how many of its last
        tokens are fed separately per mode (the queries a scorer reads must all be there).

        A stateful scorer (H2O) accumulates over every query: the prefill is patched with it
        at ratio 0, so its statistics cover both forwards; otherwise with key norm (no cost).
        Scorers read at most their ``window`` last queries (SnapKV, Expected Attention) or the
        last one (TOVA); KVzip scores by its own forwards on the whole cache.
        """
        tracked: list[KVMethod] = []
        tail = max(self.cfg.window, 1)
        for name in self.kv_methods:
            s = self.method(name, 2.0).scoring
            tail = max(tail, int(getattr(s, "window", 0) or 0))
            if s.stateful:
                tracked.append(dataclasses.replace(s, ratio=0.0))
        if any(t != tracked[0] for t in tracked[1:]):
            raise ValueError(
                "the shared prefill tracks the statistics of one stateful scorer; got "
                f"{tracked}: benchmark them in separate runs"
            )
        if tracked and getattr(tracked[0], "stride", 1) > 1:
            tail = 1 << 62  # a strided scorer samples queries counted back from the end
        return (tracked[0] if tracked else get_method("knorm", ratio=0.0)), tail

    # -------------------------------------------------------------- the recorded prefill
    def _forward(self, ids: Tensor, cache: Any = None) -> tuple[Any, dict[int, KVContext]]:
        ctxs: dict[int, KVContext] = {}
        with hd.observe(lambda c: ctxs.__setitem__(c.layer, c), evict=False):
            out = self.model(input_ids=ids, **hd.cache_kw(self.model, cache), use_cache=True,
                             logits_to_keep=1)  # fmt: skip
        return hd.cache_of(out), ctxs

    def suffixes(self, trial: Trial) -> dict[str, Tensor]:
        """What joins the context in each prefill: nothing (query-agnostic), the question but
        its last token (query-aware needle), the first continuation tokens (query-aware
        perplexity)."""
        out = {"agnostic": trial.question[:, :0]}
        if "needle" in self.cfg.tasks and self.cfg.aware:
            out["needle_aware"] = trial.question[:, :-1]
        if "ppl" in self.cfg.tasks and self.cfg.aware:
            out["ppl_aware"] = trial.continuation[:, : self.ppl_prefix(trial)]
        return out

    def ppl_prefix(self, trial: Trial) -> int:
        return min(PPL_PREFIX, trial.continuation.shape[1] // 4)

    def record(self, trial: Trial) -> Recorded:
        """``{mode: (cache, contexts, ids)}``: the uncompressed prefill of every mode, with
        each layer's scoring context, recorded by one prefill of the context minus its last
        :attr:`tail` tokens and, on forks, those tokens plus each mode's suffix."""
        ctx = trial.context
        n = ctx.shape[1]
        split = min(self.tail, n)
        out = {}
        with patched(self.model, self.tracker):
            head = self._forward(ctx[:, : n - split])[0] if split < n else None
            for mode, suffix in self.suffixes(trial).items():
                ids = torch.cat([ctx, suffix], 1)
                past = hd.fork_cache(head) if head is not None else None
                cache, ctxs = self._forward(ids[:, n - split :], past)
                out[mode] = (cache, ctxs, ids)
        return out

    def compress(
        self, rec: tuple[Any, dict[int, KVContext], Tensor], method: KVMethod, memo: dict
    ) -> Any:
        """A compressed fork of a recorded prefill (the model patched with ``method``);
        reconstruction scores are computed once per recorded prefill (``memo``)."""
        full, ctxs, ids = rec
        if not method.reconstructs:
            return hd.compress(hd.fork_cache(full), ctxs, method)
        if id(full) not in memo:
            rt = getattr(self.model, hd.ATTR)
            valid = torch.ones_like(ids, dtype=torch.bool)
            memo[id(full)] = reconstruction_scores(rt, full, (ids, None), valid, method)
        scores = memo[id(full)]
        if set(ctxs) - set(scores):  # a layer the reconstruction did not see: the full path
            return hd.compress(hd.fork_cache(full), ctxs, method, model=self.model, input_ids=ids)
        scored = {i: with_scores(copy.copy(c), scores) for i, c in ctxs.items()}
        return hd.compress(hd.fork_cache(full), scored, _prescored(method))

    # -------------------------------------------------------------- measurements
    def measure(self, acc: Acc, trial: Trial, caches: dict[str, Any]) -> dict[str, Any]:
        """Needle answers and continuation NLLs on the caches of :meth:`suffixes`' prefills.

        Perplexity is scored on the same tokens in both modes: the continuation after its
        first ``p + 1`` tokens (``p`` prefilled in the query-aware mode, one more because its
        logits come from an uncompressed prefill)."""
        cfg, model = self.cfg, self.model
        res: dict[str, Any] = {}
        if "needle" in cfg.tasks:
            kw = dict(tok=self.tok, key=trial.key, max_new=cfg.max_new_tokens, stop=self.stop)
            ok, text = greedy_answer(model, caches["agnostic"], trial.question, **kw)
            acc.agnostic.append(ok)
            if "needle_aware" in caches:
                q = trial.question[:, -1:]
                acc.aware.append(greedy_answer(model, caches["needle_aware"], q, **kw)[0])
            acc.lengths.append(trial.length)
            acc.answers.append(text)
        if "ppl" in cfg.tasks:
            p, cont = self.ppl_prefix(trial), trial.continuation
            res["nll"] = continuation_nll(model, caches["agnostic"], cont, skip=p)
            acc.nll.append(res["nll"][0])
            acc.tokens.append(res["nll"][1])
            if "ppl_aware" in caches:
                res["nll_aware"] = continuation_nll(model, caches["ppl_aware"], cont[:, p:])
                acc.nll_aware.append(res["nll_aware"][0])
                acc.tokens_aware.append(res["nll_aware"][1])
        return res

    @torch.inference_mode()
    def trial(self, trial: Trial, check: bool = False) -> None:
        """Every configuration on one trial; ``check``: recompute the one-shot perplexity
        ratios independently (:mod:`.check`)."""
        cfg, model = self.cfg, self.model
        rec = self.record(trial)
        full = {k: v[0] for k, v in rec.items()}
        with patched(model, self.tracker):  # the recorded caches are served by a patch
            base = self.measure(self.base, trial, full)
        self.tick(1)
        full_bytes = hd.kv_bytes(full["agnostic"])
        n, p = trial.context.shape[1], self.ppl_prefix(trial)
        pending = []
        for name in self.kv_methods:
            memo: dict = {}
            for f in factors_of(cfg, name):
                m = self.method(name, f)
                acc = self.acc(name, f, "oneshot")
                # measured under the method's own patch: TOVA also evicts while decoding
                with patched(model, m):
                    red = {k: self.compress(r, m, memo) for k, r in rec.items()}
                    res = self.measure(acc, trial, red)
                acc.kv_final.append(hd.kv_bytes(red["agnostic"]) / full_bytes)
                acc.kv_kept.append(kept_fraction(red["agnostic"], n, len(full["agnostic"].layers)))
                if check and "ppl" in cfg.tasks:
                    kept = {"agnostic": kept_mask(red["agnostic"], n)}
                    if "ppl_aware" in red:
                        kept["aware"] = kept_mask(red["ppl_aware"], n + p)
                    pending.append((name, f, res, kept))
                self.tick(1)
            del memo
        del rec, full
        if pending:
            self._check(trial, base, pending)
        if cfg.chunked:
            for name in self.kv_methods:
                if chunkable(self.method(name, 2.0)):
                    for f in factors_of(cfg, name):
                        self._chunked(trial, name, f, full_bytes)
                        self.tick(1)
        for name in self.dec_methods:
            for f in factors_of(cfg, name):
                self._decoder(trial, name, f, full_bytes)
                self.tick(1)

    def _check(self, trial: Trial, base: dict[str, Any], pending: list) -> None:
        """Perplexity ratios of the one-shot caches in ``pending`` recomputed with the
        unpatched model under an explicit mask of the entries kept (same scored tokens)."""
        n, p = trial.context.shape[1], self.ppl_prefix(trial)
        tokens = torch.cat([trial.context, trial.continuation], 1)
        ref_base, count = reference_nll(self.model, tokens, n, {}, n + p)

        def add(name: str, f: float, mode: str, bench: float, reference: float) -> None:
            self.checks.append({"method": name, "factor": f, "mode": mode,
                                "length": trial.length, "bench": bench, "reference": reference,
                                "diff": abs(bench - reference)})  # fmt: skip

        # the uncompressed model: the two paths agree on the NLL itself (ratio 1)
        add("uncompressed", 1.0, "agnostic", math.exp((base["nll"][0] - ref_base) / count), 1.0)
        for name, f, res, kept in pending:
            for mode, key, prefill in (("agnostic", "nll", n), ("aware", "nll_aware", n + p)):
                if mode not in kept:
                    continue
                ref, _ = reference_nll(self.model, tokens, prefill, kept[mode], n + p)
                bench = math.exp((res[key][0] - base[key][0]) / res[key][1])
                add(name, f, mode, bench, math.exp((ref - ref_base) / count))

    def _chunked(self, trial: Trial, name: str, f: float, full_bytes: int) -> None:
        """Every chunk but the last is shared by the modes; a suffix joins the final chunk."""
        cfg, model = self.cfg, self.model
        ctx = trial.context
        n = ctx.shape[1]
        last = min(cfg.chunk, n)  # chunks are aligned to the end: the final one is whole
        with patched(model, self.method(name, f)):
            pre = hd.chunked_prefill(model, ctx[:, :-last], chunk=cfg.chunk, window=cfg.window,
                                     final=False, total=n)  # fmt: skip
            out = {}
            for mode, suffix in self.suffixes(trial).items():
                tail = torch.cat([ctx[:, -last:], suffix], 1)
                out[mode] = hd.chunked_prefill(model, tail, chunk=tail.shape[1],
                                               window=cfg.window, cache=hd.fork_cache(pre.cache),
                                               total=n + suffix.shape[1])  # fmt: skip
            acc = self.acc(name, f, "chunked")
            self.measure(acc, trial, {k: v.cache for k, v in out.items()})
        acc.kv_final.append(hd.kv_bytes(out["agnostic"].cache) / full_bytes)
        acc.kv_peak.append(max(pre.peak_bytes, out["agnostic"].peak_bytes) / full_bytes)

    def _decoder(self, trial: Trial, name: str, f: float, full_bytes: int) -> None:
        """One prefill per mode; a suffix is in the prefill but outside the reducible span."""
        model = self.model
        ctx = trial.context
        acc = self.acc(name, f, "prefill")
        start = self.method(name, f).span[0]
        caches = {}
        for mode, suffix in self.suffixes(trial).items():
            m = self.method(name, f, span=(start, -suffix.shape[1])) if suffix.shape[1] else None
            with patched(model, m or self.method(name, f)):
                out = model(input_ids=torch.cat([ctx, suffix], 1), use_cache=True, logits_to_keep=1)
                caches[mode] = hd.cache_of(out)
        with patched(model, self.method(name, f)):  # reduced caches are read while patched
            self.measure(acc, trial, caches)
        acc.kv_final.append(hd.kv_bytes(caches["agnostic"]) / full_bytes)
        acc.kv_peak.append(hd.kv_bytes(caches["agnostic"]) / full_bytes)  # the prefill's peak

    # -------------------------------------------------------------- speed and memory
    @torch.inference_mode()
    def speed(self, trial: Trial) -> dict[str, Any]:
        """Prefill time of every configuration with its real patched prefill, interleaved
        with the unpatched prefill of the same context (``timing_runs`` pairs: median and
        spread); one-shot peak KV memory per configuration; decode throughput with each
        configuration's cache where the method changes decoding (TOVA evicts, AdaKV masks
        per head, decoder methods have their own caches), else once per ratio."""
        cfg, model = self.cfg, self.model
        ids = trial.context
        out: dict[str, Any] = {"prefill": {}, "peak": {}, "decode": {}}

        def prefill() -> Any:
            return hd.cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))

        def chunked() -> Any:
            return hd.chunked_prefill(model, ids, chunk=cfg.chunk, window=cfg.window).cache

        def timed(run: Callable[[], Any], method: Any) -> tuple[list[float], Any]:
            ratios, red = [], None
            for _ in range(max(cfg.timing_runs, 1)):
                t0 = time.perf_counter()
                prefill()
                tb = time.perf_counter() - t0
                with patched(model, method):
                    t0 = time.perf_counter()
                    red = run()
                    ratios.append((time.perf_counter() - t0) / tb)
            return ratios, red

        full = prefill()  # also the warm-up
        fb = hd.kv_bytes(full)
        configs = [(m, f, "oneshot") for m in self.kv_methods for f in factors_of(cfg, m)]
        if cfg.chunked:
            configs += [(m, f, "chunked") for m in self.kv_methods for f in factors_of(cfg, m)
                        if chunkable(self.method(m, f))]  # fmt: skip
        configs += [(m, f, "prefill") for m in self.dec_methods for f in factors_of(cfg, m)]
        for name, f, mode in configs:
            method = self.method(name, f)
            ratios, red = timed(chunked if mode == "chunked" else prefill, method)
            out["prefill"][name, f, mode] = spread_of(ratios)
            if mode == "oneshot":
                out["peak"][name, f] = red.peak_bytes / fb
            own = mode == "prefill" or (mode == "oneshot" and (method.decode_evict
                                                               or method.ragged))  # fmt: skip
            if own:
                out["decode"][name, f, mode] = self._decode_ratio(full, red, method)
            self.tick(1)
        for f in all_factors(cfg):  # every other KV cache decodes at the speed of its size
            method = get_method("knorm", ratio=ratio_of(f))
            with patched(model, method):
                red = prefill()
            out["decode"]["kv", f] = self._decode_ratio(full, red, method)
            self.tick(1)
        return out

    def _decode_ratio(self, full: Any, red: Any, method: Any) -> float:
        """Decode speed with the reduced cache (patched model) over the unpatched model with
        the full cache (at least 3 interleaved pairs: decoding is cheap and noisy)."""
        pairs = []
        for _ in range(max(self.cfg.timing_runs, 3)):
            tb = self._decode(full)
            with patched(self.model, method):
                pairs.append(tb / self._decode(red))
        return statistics.median(pairs)

    def _decode(self, cache: Any) -> float:
        cache = hd.fork_cache(cache)
        x = torch.tensor([[self.tok.eos_token_id or 0]])
        t0 = time.perf_counter()
        for _ in range(self.cfg.decode_tokens):
            out = self.model(input_ids=x, **hd.cache_kw(self.model, cache), use_cache=True)
            x = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def memory(self, trials_by_length: dict[int, Trial]) -> list[dict[str, Any]]:
        """Peak KV bytes against context length: uncompressed, one-shot 8x, and chunked
        prefill with a fixed budget (which should stay flat)."""
        cfg, model = self.cfg, self.model
        rows = []
        for length, trial in sorted(trials_by_length.items()):
            ids = trial.context[:, :length]
            full = hd.cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
            fb = hd.kv_bytes(full)
            del full
            with patched(model, get_method("knorm", ratio=ratio_of(8.0))):
                one = hd.cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
                chunked = hd.chunked_prefill(
                    model, ids, chunk=cfg.chunk, budget=cfg.memory_budget, window=cfg.window
                )
            rows.append(
                {
                    "length": length,
                    "full_mb": fb / 2**20,
                    "oneshot8_peak_mb": one.peak_bytes / 2**20,
                    "chunked_peak_mb": chunked.peak_bytes / 2**20,
                    "chunked_final_mb": hd.kv_bytes(chunked.cache) / 2**20,
                    "budget": cfg.memory_budget,
                    "chunk": cfg.chunk,
                }
            )
            self.tick(1)
        return rows
