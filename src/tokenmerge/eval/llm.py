"""The LLM benchmark: KV-cache and layer-K methods on a decoder LLM, always against the
uncompressed model in the same run.

Every trial is a haystack of real English text (Austen, Moby-Dick, the Jargon File, the Python
tutorial; :mod:`tokenmerge.eval.corpora`) of ``L`` tokens with a pass key sentence placed at a
given depth, the text that follows the haystack in its book, and the question
``"What is the pass key? The pass key is"``. Measured per method, budget and prefill mode:

- **needle accuracy**, query-agnostic (the context is compressed before the question is seen,
  which then attends to the compressed cache at its original positions) and query-aware (the
  question is part of the compressed prefill; only its last token and the answer attend to the
  compressed cache). A trial counts as correct when greedy decoding produces the key exactly:
  the answer tokens are teacher-forced in one forward and each must be the argmax.
- **perplexity ratio**: perplexity of the real continuation given the compressed context, over
  the uncompressed model's on the same tokens, pooled over trials; query-agnostic (the
  continuation is fed after the compressed context) and query-aware (its first ``PPL_PREFIX``
  tokens are prefilled and compressed with the context, so an observation window sees them).
  Both score the continuation after its first ``PPL_PREFIX + 1`` tokens (the logits of the one
  after the prefill come from the uncompressed prefill).
- **KV memory**: final cache bytes and peak bytes during the prefill, over the uncompressed
  cache's (which peaks at its final size).
- **prefill latency ratio** (reduced / uncompressed; < 1 is faster) and **decode throughput
  ratio** (reduced / uncompressed; > 1 is faster).

Prefill modes for KV methods: ``oneshot`` (each layer is compressed right after its
attention in a single prefill) and ``chunked`` (:func:`~tokenmerge.adapters.hf_decoder.
chunked_prefill`: ``chunk`` tokens at a time, evicted to the final budget after every chunk,
with a stabilising window of ``window`` recent tokens). Decoder-site methods (FastV, AIM,
HoliTom) reduce the span of the context at layer K in a single prefill.

How the cost is kept down (the results are those of running each method on its own, up to
floating-point rounding): one-shot compression does not change the prefill's computation, so
each trial is prefilled once (the context minus its last ``window`` tokens, then those tokens
alone or with the question, so that observation windows see what one prefill would show them),
every layer's scoring context is recorded (:func:`~tokenmerge.adapters.hf_decoder.observe`), and
every one-shot method and ratio compresses a copy of that cache with the code a patched forward
runs (:func:`~tokenmerge.adapters.hf_decoder.compress`; the tests check they are bit-identical).
Chunked prefills share every chunk but the last between the two modes (in query-aware mode the
question joins the final chunk). Latency is measured separately, on one context, interleaving
each configuration with the uncompressed prefill; one-shot prefill time does not depend on the
ratio (measured once per scorer), one-shot peak memory and decode throughput depend only on the
cache sizes (measured once per ratio).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import hf_decoder as hd
from ..api import patched
from ..methods import REGISTRY, get_method
from ..methods.decoder import DecoderMethod
from ..methods.kv import KV_SCORERS, KVContext, KVMethod

TASKS = frozenset({"needle", "ppl", "memory", "speed"})
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
#: continuation tokens prefilled in the query-aware perplexity mode
PPL_PREFIX = 16
QUICK: dict[str, Any] = {
    "n": 2,
    "budgets": "2,8",
    "methods": ",".join(KV_SCORERS) + ",fastv",
    "timing_runs": 1,
    "lengths": (1024,),
    "memory_lengths": (512, 1024),
    "speed_length": 512,
    "continuation": 64,
    "decode_tokens": 16,
}


@dataclass
class LLMBenchConfig:
    """What to run (see the module docstring)."""

    model: str = "smollm2-135m"
    methods: Sequence[str] = KV_SCORERS
    factors: Sequence[float] = (2.0, 4.0, 8.0)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    corpora: Sequence[str] = ("austen", "mobydick", "jargon", "pydocs")
    lengths: Sequence[int] = (1024, 2048)
    depths: int = 3
    continuation: int = 128
    chunk: int = 256
    window: int = 64
    chunked: bool = True
    memory_lengths: Sequence[int] = (1024, 2048, 4096)
    memory_budget: int = 256
    speed_length: int = 1024
    decode_tokens: int = 32
    timing_runs: int = 1
    seed: int = 0
    tasks: frozenset[str] = TASKS


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One haystack: ``context`` (haystack with the needle), ``question``, ``answer`` (the
    key's tokens) and the real ``continuation`` of the haystack, each ``[1, n]``."""

    corpus: str
    length: int
    depth: float
    key: str
    context: Tensor
    question: Tensor
    answer: Tensor
    continuation: Tensor


def _ids(tok: Any, s: str) -> list[int]:
    return tok(s, add_special_tokens=False).input_ids


def _window(tok: Any, text: str, n: int, rng: random.Random) -> list[int]:
    """``n`` tokens of ``text`` from a random paragraph start."""
    chars = 8 * n
    for _ in range(8):
        start = rng.randrange(0, max(len(text) - chars, 1))
        start = text.find("\n\n", start)
        start = 0 if start < 0 else start + 2
        ids = _ids(tok, text[start : start + chars])
        if len(ids) >= n:
            return ids[:n]
        chars *= 2
    raise ValueError(f"the corpus is too short for {n} tokens")


def make_trials(
    tok: Any,
    lengths: Sequence[int],
    depths: int,
    corpora: Sequence[str],
    continuation: int,
    seed: int = 0,
) -> list[Trial]:
    """Needle trials: every length at ``depths`` evenly spread depths, corpora in turn."""
    from . import corpora as C

    rng = random.Random(seed)
    out = []
    k = 0
    for length in lengths:
        for d in range(depths):
            name = corpora[k % len(corpora)]
            k += 1
            depth = (d + 0.5) / depths
            ids = _window(tok, C.text(name), length + continuation, rng)
            hay, cont = ids[:length], ids[length:]
            key = str(rng.randrange(10000, 100000))
            at = int(depth * length)
            ctx = hay[:at] + _ids(tok, NEEDLE.format(key=key)) + hay[at:]
            out.append(
                Trial(
                    corpus=name,
                    length=length,
                    depth=depth,
                    key=key,
                    context=torch.tensor([ctx]),
                    question=torch.tensor([_ids(tok, QUESTION)]),
                    answer=torch.tensor([_ids(tok, " " + key)]),
                    continuation=torch.tensor([cont]),
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# Measurements on a cache
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def needle_correct(model: nn.Module, cache: Any, prompt: Tensor, answer: Tensor) -> bool:
    """Whether greedy decoding after ``prompt`` (fed on a copy of ``cache``) yields ``answer``
    exactly; checked in one forward by teacher-forcing the answer."""
    x = torch.cat([prompt, answer[:, :-1]], 1)
    logits = model(input_ids=x, **hd.cache_kw(model, hd.fork_cache(cache)), use_cache=True).logits
    pred = logits[0, prompt.shape[1] - 1 :].argmax(-1)
    return bool(torch.equal(pred, answer[0]))


@torch.inference_mode()
def continuation_nll(
    model: nn.Module, cache: Any, tokens: Tensor, skip: int = 0
) -> tuple[float, int]:
    """Feed ``tokens`` on a copy of ``cache``; summed negative log-likelihood of
    ``tokens[skip + 1:]`` (each predicted from the token before it) and their count."""
    logits = model(
        input_ids=tokens, **hd.cache_kw(model, hd.fork_cache(cache)), use_cache=True
    ).logits
    logp = torch.log_softmax(logits[0, skip:-1].float(), -1)
    nll = -logp.gather(1, tokens[0, skip + 1 :, None]).sum()
    return float(nll), tokens.shape[1] - skip - 1


@dataclass
class _Acc:
    """Accumulates one configuration's measurements over trials."""

    agnostic: list[bool] = field(default_factory=list)
    aware: list[bool] = field(default_factory=list)
    nll: float = 0.0
    tokens: int = 0
    nll_aware: float = 0.0
    tokens_aware: int = 0
    kv_final: list[float] = field(default_factory=list)
    kv_peak: list[float] = field(default_factory=list)
    by_length: dict[int, list[bool]] = field(default_factory=dict)


def _ratio(f: float) -> float:
    """Compression factor (2 = 2x) -> fraction removed."""
    return 1.0 - 1.0 / f


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Runner:
    def __init__(self, cfg: LLMBenchConfig, model: nn.Module, tok: Any, tick: Callable) -> None:
        self.cfg, self.model, self.tok, self.tick = cfg, model, tok, tick
        self.kv_methods = [m for m in cfg.methods if issubclass(REGISTRY[m], KVMethod)]
        self.dec_methods = [m for m in cfg.methods if issubclass(REGISTRY[m], DecoderMethod)]
        self.accs: dict[tuple[str, float, str], _Acc] = {}
        self.base = _Acc()

    def method(self, name: str, factor: float, **extra: Any) -> Any:
        params = {**self.cfg.method_params.get(name, {}), **extra}
        return get_method(name, ratio=_ratio(factor), **params)

    def acc(self, name: str, factor: float, mode: str) -> _Acc:
        return self.accs.setdefault((name, factor, mode), _Acc())

    # -------------------------------------------------------------- helpers
    def _record(self, ids: Tensor, cache: Any = None) -> tuple[Any, dict[int, KVContext]]:
        ctxs: dict[int, KVContext] = {}
        with hd.observe(lambda c: ctxs.__setitem__(c.layer, c), evict=False):
            out = self.model(input_ids=ids, **hd.cache_kw(self.model, cache), use_cache=True,
                             logits_to_keep=1)  # fmt: skip
        return hd.cache_of(out), ctxs

    def _suffixes(self, trial: Trial) -> dict[str, Tensor]:
        """What joins the context in each prefill: nothing (query-agnostic), the question but
        its last token (query-aware needle), the first continuation tokens (query-aware
        perplexity)."""
        out = {"agnostic": trial.question[:, :0]}
        if "needle" in self.cfg.tasks:
            out["needle_aware"] = trial.question[:, :-1]
        if "ppl" in self.cfg.tasks:
            out["ppl_aware"] = trial.continuation[:, : self._ppl_prefix(trial)]
        return out

    def _ppl_prefix(self, trial: Trial) -> int:
        return min(PPL_PREFIX, trial.continuation.shape[1] // 4)

    def _measure(self, acc: _Acc, trial: Trial, caches: dict[str, Any]) -> None:
        """Needle and perplexity from the caches of the prefills of :meth:`_suffixes`.

        Perplexity is scored on the same tokens in both modes: the continuation after its
        first ``p + 1`` tokens (``p`` prefilled in the query-aware mode, one more because its
        logits come from an uncompressed prefill)."""
        cfg, model = self.cfg, self.model
        if "needle" in cfg.tasks:
            ok = needle_correct(model, caches["agnostic"], trial.question, trial.answer)
            acc.agnostic.append(ok)
            acc.by_length.setdefault(trial.length, []).append(ok)
            aware = needle_correct(model, caches["needle_aware"], trial.question[:, -1:],
                                   trial.answer)  # fmt: skip
            acc.aware.append(aware)
        if "ppl" in cfg.tasks:
            p, cont = self._ppl_prefix(trial), trial.continuation
            nll, n = continuation_nll(model, caches["agnostic"], cont, skip=p)
            acc.nll += nll
            acc.tokens += n
            nll, n = continuation_nll(model, caches["ppl_aware"], cont[:, p:])
            acc.nll_aware += nll
            acc.tokens_aware += n

    # -------------------------------------------------------------- one trial
    @torch.inference_mode()
    def trial(self, trial: Trial) -> None:
        cfg, model = self.cfg, self.model
        ctx = trial.context
        split = max(cfg.window, self._snap_window(), 1)
        tail = ctx[:, -split:]
        suffixes = self._suffixes(trial)
        # one recorded prefill serves the baseline and every one-shot method: the context
        # minus its tail, then (on copies) the tail plus each suffix, so that observation
        # windows see what a single prefill would show them
        tracker = get_method("h2o" if "h2o" in self.kv_methods else "knorm", ratio=0.0)
        with patched(model, tracker):
            head, _ = self._record(ctx[:, :-split])
            full, ctxs = {}, {}
            for mode, suffix in suffixes.items():
                full[mode], ctxs[mode] = self._record(torch.cat([tail, suffix], 1),
                                                      hd.fork_cache(head))  # fmt: skip
            del head
            full_bytes = hd.kv_bytes(full["agnostic"])
            self._measure(self.base, trial, full)
            self.tick(1)
            for name in self.kv_methods:
                for f in cfg.factors:
                    m = self.method(name, f)
                    red = {k: hd.compress(hd.fork_cache(full[k]), ctxs[k], m) for k in full}
                    acc = self.acc(name, f, "oneshot")
                    self._measure(acc, trial, red)
                    acc.kv_final.append(hd.kv_bytes(red["agnostic"]) / full_bytes)
                    self.tick(1)
        del full, ctxs
        if cfg.chunked:
            for name in self.kv_methods:
                for f in cfg.factors:
                    self._chunked(trial, name, f, full_bytes)
                    self.tick(1)
        for name in self.dec_methods:
            for f in cfg.factors:
                self._decoder(trial, name, f, full_bytes)
                self.tick(1)

    def _snap_window(self) -> int:
        if "snapkv" not in self.kv_methods:
            return 0
        return int(self.cfg.method_params.get("snapkv", {}).get("window", 64))

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
            for mode, suffix in self._suffixes(trial).items():
                tail = torch.cat([ctx[:, -last:], suffix], 1)
                out[mode] = hd.chunked_prefill(model, tail, chunk=tail.shape[1],
                                               window=cfg.window, cache=hd.fork_cache(pre.cache),
                                               total=n + suffix.shape[1])  # fmt: skip
            acc = self.acc(name, f, "chunked")
            self._measure(acc, trial, {k: v.cache for k, v in out.items()})
            acc.kv_final.append(hd.kv_bytes(out["agnostic"].cache) / full_bytes)
            acc.kv_peak.append(max(pre.peak_bytes, out["agnostic"].peak_bytes) / full_bytes)

    def _decoder(self, trial: Trial, name: str, f: float, full_bytes: int) -> None:
        """One prefill per mode; a suffix is in the prefill but outside the reducible span."""
        model = self.model
        ctx = trial.context
        acc = self.acc(name, f, "prefill")
        start = self.method(name, f).span[0]
        caches = {}
        for mode, suffix in self._suffixes(trial).items():
            m = self.method(name, f, span=(start, -suffix.shape[1])) if suffix.shape[1] else None
            with patched(model, m or self.method(name, f)):
                out = model(input_ids=torch.cat([ctx, suffix], 1), use_cache=True, logits_to_keep=1)
                caches[mode] = hd.cache_of(out)
        with patched(model, self.method(name, f)):  # reduced caches are read while patched
            self._measure(acc, trial, caches)
        acc.kv_final.append(hd.kv_bytes(caches["agnostic"]) / full_bytes)
        acc.kv_peak.append(hd.kv_bytes(caches["agnostic"]) / full_bytes)  # the prefill's peak

    # -------------------------------------------------------------- speed and memory
    @torch.inference_mode()
    def speed(self, trial: Trial) -> dict[str, Any]:
        """Prefill latency of every configuration, interleaved with the uncompressed prefill
        of the same context; the one-shot peak KV memory and the decode throughput per ratio
        (both independent of the scorer); decoder methods' decode with their own caches."""
        cfg, model = self.cfg, self.model
        ids = trial.context
        out: dict[str, Any] = {"prefill": {}, "peak": {}, "decode": {}}
        mid = sorted(cfg.factors)[len(cfg.factors) // 2]

        def prefill() -> Any:
            return hd.cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))

        def chunked() -> Any:
            return hd.chunked_prefill(model, ids, chunk=cfg.chunk, window=cfg.window).cache

        def ratio(run: Callable[[], Any], method: Any) -> Any:
            ratios, red = [], None
            for _ in range(cfg.timing_runs):
                t0 = time.perf_counter()
                prefill()
                tb = time.perf_counter() - t0
                with patched(model, method):
                    t0 = time.perf_counter()
                    red = run()
                    ratios.append((time.perf_counter() - t0) / tb)
            return statistics.median(ratios), red

        full = prefill()  # also the warm-up
        configs = [(m, mid, "oneshot") for m in self.kv_methods]
        if cfg.chunked:
            configs += [(m, f, "chunked") for m in self.kv_methods for f in cfg.factors]
        configs += [(m, f, "prefill") for m in self.dec_methods for f in cfg.factors]
        for name, f, mode in configs:
            method = self.method(name, f)
            r, red = ratio(chunked if mode == "chunked" else prefill, method)
            out["prefill"][name, f, mode] = r
            if mode == "prefill":  # a decoder method: decode with its own cache
                out["decode"][name, f] = self._decode_ratio(full, red, method)
            self.tick(1)
        # KV methods: peak memory and decode speed depend on the cache sizes only
        for f in cfg.factors:
            method = get_method("knorm", ratio=_ratio(f))
            with patched(model, method):
                red = prefill()
            out["peak"][f] = red.peak_bytes / hd.kv_bytes(full)
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
            with patched(model, get_method("knorm", ratio=_ratio(8.0))):
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


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(statistics.fmean(xs)) if xs else None


def run(cfg: LLMBenchConfig, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows", "base", "memory", "trials"}``."""
    from . import report, zoo

    unknown = set(cfg.tasks) - TASKS
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; accepted: {sorted(TASKS)}")
    for m in cfg.methods:
        if m not in REGISTRY or REGISTRY[m].site not in ("kv", "decoder"):
            llm = sorted(n for n, c in REGISTRY.items() if c.site in ("kv", "decoder"))
            raise ValueError(f"{m!r} is not a KV or decoder method; choose from {llm}")
    if any(f < 1.0 for f in cfg.factors):
        raise ValueError(f"compression factors must be >= 1 (2 = 2x), got {cfg.factors}")
    tick = progress or (lambda k: None)
    torch.manual_seed(cfg.seed)
    model, tok = zoo.load_causal_lm(cfg.model)
    hd.DecoderAdapter().target(model)  # refuse an unsupported model before any work
    r = _Runner(cfg, model, tok, tick)
    trials = make_trials(tok, cfg.lengths, cfg.depths, cfg.corpora, cfg.continuation, cfg.seed)
    if cfg.tasks & {"needle", "ppl"}:
        for t in trials:
            r.trial(t)
    speed = None
    if "speed" in cfg.tasks:
        st = make_trials(tok, [cfg.speed_length], 1, cfg.corpora[:1], 1, cfg.seed + 1)[0]
        speed = r.speed(st)
    memory = []
    if "memory" in cfg.tasks:
        mt = make_trials(tok, cfg.memory_lengths, 1, cfg.corpora[:1], 1, cfg.seed + 2)
        memory = r.memory({t.length: t for t in mt})
    base_ppl = math.exp(r.base.nll / r.base.tokens) if r.base.tokens else None
    base_ppl_aw = math.exp(r.base.nll_aware / r.base.tokens_aware) if r.base.tokens_aware else None
    speed_mid = sorted(cfg.factors)[len(cfg.factors) // 2]
    base = {
        "needle_agnostic": _mean(r.base.agnostic),
        "needle_aware": _mean(r.base.aware),
        "ppl": base_ppl,
        "ppl_aware": base_ppl_aw,
        "needle_by_length": {k: _mean(v) for k, v in r.base.by_length.items()},
    }
    rows = []
    for (name, f, mode), a in r.accs.items():
        ppl = math.exp(a.nll / a.tokens) if a.tokens else None
        ppl_aw = math.exp(a.nll_aware / a.tokens_aware) if a.tokens_aware else None
        peak = _mean(a.kv_peak)
        prefill = decode = None
        if speed is not None:
            key = (name, speed_mid, mode) if mode == "oneshot" else (name, f, mode)
            prefill = speed["prefill"].get(key)
            decode = speed["decode"].get((name, f) if mode == "prefill" else ("kv", f))
            if mode == "oneshot":
                peak = speed["peak"].get(f)
        rows.append(
            {
                "model": cfg.model,
                "method": name,
                "factor": f,
                "budget": f"{f:g}x",
                "prefill_mode": mode,
                "params": report.method_params(r.method(name, f), f"{f:g}x"),
                "trials": len(a.agnostic) or len(trials),
                "needle_agnostic": _mean(a.agnostic),
                "needle_aware": _mean(a.aware),
                "needle_by_length": {k: _mean(v) for k, v in a.by_length.items()},
                "needle_lengths": " ".join(
                    f"{k}:{_mean(v):.2f}" for k, v in sorted(a.by_length.items())
                ),
                "ppl": ppl,
                "ppl_ratio": ppl / base_ppl if ppl and base_ppl else None,
                "ppl_aware": ppl_aw,
                "ppl_ratio_aware": ppl_aw / base_ppl_aw if ppl_aw and base_ppl_aw else None,
                "kv_final_ratio": _mean(a.kv_final),
                "kv_peak_ratio": peak,
                "prefill_ratio": prefill,
                "decode_ratio": decode,
            }
        )
    order = {m: i for i, m in enumerate(cfg.methods)}
    rows.sort(key=lambda x: (order[x["method"]], x["prefill_mode"] != "oneshot", x["factor"]))
    info = [
        {"corpus": t.corpus, "length": t.length, "depth": t.depth, "context": t.context.shape[1]}
        for t in trials
    ]
    return {"rows": rows, "base": base, "memory": memory, "trials": info}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def winners(rows: list[dict[str, Any]]) -> str:
    """One line per budget: the best method on each quality measure."""
    lines = []
    for f in sorted({r["factor"] for r in rows}):
        at = [r for r in rows if r["factor"] == f]
        parts = []
        for key, label, best in (
            ("needle_agnostic", "needle (query-agnostic)", max),
            ("needle_aware", "needle (query-aware)", max),
            ("ppl_ratio", "perplexity (query-agnostic)", min),
            ("ppl_ratio_aware", "perplexity (query-aware)", min),
        ):
            scored = [r for r in at if r.get(key) is not None]
            if not scored:
                continue
            top = best(r[key] for r in scored)
            names = [f"{r['method']} ({r['prefill_mode']})" for r in scored if r[key] == top]
            if key.startswith("needle") and top == 0:
                parts.append(f"{label}: none (every method at 0)")
            elif len(names) > 3:
                parts.append(f"{label}: {len(names)} configurations tied at {top:.3f}")
            else:
                parts.append(f"{label}: {', '.join(names)} at {top:.3f}")
        if parts:
            lines.append(f"- **{f:g}x**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for decoder LLMs (called by the CLI)."""
    from tqdm import tqdm

    from ..cli.main import parse_params

    if getattr(args, "batch_size", None):
        raise SystemExit("--batch-size does not apply to the LLM bench (one sequence at a time)")
    params = parse_params(args.param or [])
    bench = params.pop("bench", {})
    if args.quick:
        for k in ("n", "budgets", "methods", "timing_runs"):
            if getattr(args, k, None) is None:
                setattr(args, k, QUICK[k])
        for k in ("lengths", "memory_lengths", "speed_length", "continuation", "decode_tokens"):
            bench.setdefault(k, QUICK[k])
    methods = [m.strip() for m in (args.methods or ",".join(LLMBenchConfig.methods)).split(",")]
    for m in methods:
        if m not in REGISTRY:
            raise SystemExit(f"unknown method {m!r}; registered: {', '.join(sorted(REGISTRY))}")
    try:
        factors = [float(b.strip().rstrip("x")) for b in (args.budgets or "2,4,8").split(",")]
    except ValueError:
        raise SystemExit(
            f"--budgets for LLMs are compression factors like 2,4,8; got {args.budgets!r}"
        ) from None
    tasks = frozenset(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS

    def ints(v: Any) -> tuple[int, ...]:
        return tuple(int(x) for x in str(v).split("/")) if not isinstance(v, tuple) else v

    known = {"lengths", "memory_lengths", "chunk", "window", "continuation", "speed_length",
             "decode_tokens", "chunked", "memory_budget"}  # fmt: skip
    if set(bench) - known:
        raise SystemExit(f"unknown bench.* settings {sorted(set(bench) - known)}; known: "
                         f"{sorted(known)}")  # fmt: skip
    d = LLMBenchConfig()
    cfg = LLMBenchConfig(
        model=args.model,
        methods=methods,
        factors=factors,
        method_params=params,
        corpora=tuple(c.strip() for c in args.dataset.split(",")) if args.dataset else d.corpora,
        lengths=ints(bench.get("lengths", d.lengths)),
        depths=args.n or d.depths,
        continuation=int(bench.get("continuation", d.continuation)),
        chunk=int(bench.get("chunk", d.chunk)),
        window=int(bench.get("window", d.window)),
        chunked=bool(bench.get("chunked", d.chunked)),
        memory_lengths=ints(bench.get("memory_lengths", d.memory_lengths)),
        memory_budget=int(bench.get("memory_budget", d.memory_budget)),
        speed_length=int(bench.get("speed_length", d.speed_length)),
        decode_tokens=int(bench.get("decode_tokens", d.decode_tokens)),
        timing_runs=args.timing_runs or d.timing_runs,
        seed=args.seed,
        tasks=tasks,
    )
    n_kv = sum(issubclass(REGISTRY[m], KVMethod) for m in methods)
    n_dec = len(methods) - n_kv
    per_trial = 1 + len(factors) * (n_kv * (2 if cfg.chunked else 1) + n_dec)
    total = 0
    if tasks & {"needle", "ppl"}:
        total += per_trial * len(cfg.lengths) * cfg.depths
    n_speed = n_kv + len(factors) * (n_kv * cfg.chunked + n_dec + 1)
    total += n_speed * ("speed" in tasks)
    total += len(cfg.memory_lengths) * ("memory" in tasks)
    with tqdm(total=total, desc="bench", unit="step", file=sys.stderr) as bar:
        result = run(cfg, bar.update)
    return _write(args, cfg, result)


def _write(args: argparse.Namespace, cfg: LLMBenchConfig, result: dict[str, Any]) -> int:
    from pathlib import Path

    from . import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or re.sub(r"[^A-Za-z0-9._-]", "_", cfg.model)
    meta = report.provenance(cfg.seed)
    meta["config"] = {
        k: (list(v) if isinstance(v, (tuple, frozenset)) else v)
        for k, v in vars(cfg).items()
        if k not in ("method_params",)
    } | {"method_params": cfg.method_params, "tasks": sorted(cfg.tasks)}
    meta["base"] = result["base"]
    meta["memory"] = result["memory"]
    meta["trials"] = result["trials"]
    rows = result["rows"]
    report.write_json(out / f"{stem}.json", meta, rows)
    b = result["base"]
    cols = [
        ("method", "method"),
        ("budget", "budget"),
        ("prefill_mode", "prefill"),
        ("needle_agnostic", "needle (agnostic)"),
        ("needle_aware", "needle (aware)"),
        ("needle_lengths", "agnostic by length"),
        ("ppl_ratio", "ppl ratio (agnostic)"),
        ("ppl_ratio_aware", "ppl ratio (aware)"),
        ("kv_final_ratio", "KV final"),
        ("kv_peak_ratio", "KV peak"),
        ("prefill_ratio", "prefill time"),
        ("decode_ratio", "decode speed"),
    ]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    notes = (
        f"{cfg.model}, {len(result['trials'])} needle trials (context lengths "
        f"{', '.join(map(str, cfg.lengths))} tokens, {cfg.depths} depths each, corpora "
        f"{', '.join(cfg.corpora)}), continuation {cfg.continuation} tokens. Uncompressed "
        f"model in the same run: needle {fmt(b['needle_agnostic'])} (agnostic) / "
        f"{fmt(b['needle_aware'])} (aware), perplexity {fmt(b['ppl'])} (agnostic) / "
        f"{fmt(b['ppl_aware'])} (aware).\n\n"
        "Ratios are against the uncompressed model: KV final/peak = cache bytes (peak = the "
        "most held at once during the prefill); prefill time = reduced / uncompressed "
        "(< 1 is faster); decode speed = reduced / uncompressed tokens per second (> 1 is "
        "faster). Times come from one context of "
        f"{cfg.speed_length} tokens, interleaved with the uncompressed model. One-shot prefill "
        "time does not depend on the ratio (measured per scorer at the middle one); one-shot "
        "peak memory and KV decode speed do not depend on the scorer (measured per ratio). "
        f"Chunked prefill: {cfg.chunk}-token chunks, {cfg.window} stabilising tokens. "
        f"Perplexity: of the continuation after its first {PPL_PREFIX + 1} tokens, given the "
        f"compressed context (agnostic) or the context plus the first {PPL_PREFIX} "
        "continuation tokens compressed together (aware).\n\n"
        "Which method wins:\n\n" + winners(rows) + "\n"
    )
    md = report.markdown(rows, cols, meta, f"tokenmerge bench: {cfg.model}", notes)
    if result["memory"]:
        mem = ["\n## Peak KV memory against context length\n",
               "| context | uncompressed MB | one-shot 8x peak MB | chunked peak MB | "
               "chunked final MB |", "|---|---|---|---|---|"]  # fmt: skip
        for m in result["memory"]:
            mem.append(
                f"| {m['length']} | {m['full_mb']:.1f} | {m['oneshot8_peak_mb']:.1f} | "
                f"{m['chunked_peak_mb']:.1f} | {m['chunked_final_mb']:.1f} |"
            )
        m0 = result["memory"][0]
        mem.append(
            f"\nChunked prefill with key norm, a fixed budget of {m0['budget']} entries per "
            f"layer and {m0['chunk']}-token chunks: its peak stays flat as the context grows.\n"
        )
        md += "\n".join(mem)
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.json, .md")
    return 0
