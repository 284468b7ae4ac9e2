"""LLM part: KV-cache methods on SmolLM2-135M and Qwen2.5-0.5B (published configs, random
weights) at long contexts: prefill time, decode time per token and peak memory, each
against the unpatched model with its full cache, in the same run."""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...adapters import hf_decoder as hd
from ...api import apply, patched, remove
from ...methods import get_method
from ...methods.base import Method
from ..llm.check import kept_fraction
from ..throughput import interleave
from .config import Clock, Device, GpuBenchConfig, KVSpec, LMSpec, dtype_of
from .report import Recorder, attempt

PART = "llm-kv"
MB = 2**20


def build_lm(spec: LMSpec, cfg: GpuBenchConfig, dev: Device) -> nn.Module:
    """``spec``'s model from its config (random weights), on the device, with SDPA."""
    import transformers

    config = getattr(transformers, spec.config)(
        **{**spec.params, **cfg.lm_overrides}, attn_implementation="sdpa"
    )
    torch.manual_seed(cfg.seed)
    with dev.torch:
        model = getattr(transformers, spec.model)(config)
    return model.to(dtype_of(cfg.llm_dtype)).eval()


@dataclass
class Prefill:
    """One prefill: its cache, the first greedy token, and the memory it took."""

    cache: Any
    first: Tensor
    peak: int | None  # bytes allocated at the peak (CUDA only)
    before: int | None  # bytes allocated when it started


def prefill(model: nn.Module, ids: Tensor, dev: Device) -> Prefill:
    before = dev.start_peak()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].argmax(-1)
    dev.sync()
    return Prefill(hd.cache_of(out), first, dev.peak(), before)


def decode(model: nn.Module, cache: Any, first: Tensor, n: int, dev: Device) -> list[float]:
    """Seconds of each of ``n`` greedy decoding steps on ``cache`` (which grows)."""
    x, out = first, []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = model(input_ids=x, **hd.cache_kw(model, cache), use_cache=True).logits
        x = logits[:, -1:].argmax(-1)
        dev.sync()
        out.append(time.perf_counter() - t0)
    return out


def _kv(cache: Any, n: int, depth: int) -> dict[str, Any]:
    """What the cache holds after the prefill of ``n`` tokens."""
    stored = [layer.keys.shape[-2] for layer in cache.layers[:depth]]
    reduced = isinstance(cache, hd.ReducedCache) and cache.reduced
    held = hd.kv_bytes(cache)
    return {
        "kv_entries": statistics.fmean(stored),
        "kv_entries_max": max(stored),
        "kv_kept": kept_fraction(cache, n, depth) if reduced else 1.0,
        "kv_mb": held / MB,
        "kv_peak_mb": max(getattr(cache, "peak_bytes", 0), held) / MB,
    }


def _memory(p: Prefill) -> dict[str, Any]:
    if p.peak is None or p.before is None:
        return {"peak_mb": None, "peak_extra_mb": None}
    return {"peak_mb": p.peak / MB, "peak_extra_mb": (p.peak - p.before) / MB}


@torch.inference_mode()
def baseline(model: nn.Module, ids: Tensor, cfg: GpuBenchConfig, dev: Device) -> Prefill:
    """The unpatched prefill (repeated: the first runs warm up) and its cache."""
    for _ in range(cfg.llm_warmup):
        prefill(model, ids, dev)
    return prefill(model, ids, dev)


@torch.inference_mode()
def base_row(
    model: nn.Module, ids: Tensor, ref: Prefill, cfg: GpuBenchConfig, dev: Device
) -> dict[str, Any]:
    """The unpatched model: prefill times, decode time per token, memory, full cache."""
    times = []
    for _ in range(cfg.llm_runs):
        t0 = time.perf_counter()
        prefill(model, ids, dev)
        times.append(time.perf_counter() - t0)
    steps = decode(model, hd.fork_cache(ref.cache), ref.first, cfg.decode_tokens, dev)
    return {
        **_kv(ref.cache, ids.shape[1], model.config.num_hidden_layers),
        **_memory(ref),
        "prefill_ms": 1e3 * statistics.median(times),
        "prefill_speedup": 1.0,
        "decode_ms": 1e3 * statistics.median(steps),
        "decode_speedup": 1.0,
        "peak_ratio": None if ref.peak is None else 1.0,
        "attention": model.config._attn_implementation,
    }


def make_method(spec: KVSpec, cfg: GpuBenchConfig) -> Method:
    return get_method(spec.method, ratio=cfg.kv_ratio, **spec.params)


@torch.inference_mode()
def method_row(
    model: nn.Module,
    ids: Tensor,
    ref: Prefill,
    method: Method,
    cfg: GpuBenchConfig,
    dev: Device,
) -> dict[str, Any]:
    """``method`` against the unpatched model: interleaved prefill pairs (the patched one
    compresses), then one decode of each on its own cache."""
    last: dict[str, Prefill] = {}
    base_peaks: list[Prefill] = []
    state: dict[str, str] = {}

    def base() -> None:
        base_peaks[:] = [prefill(model, ids, dev)]
        base_peaks[0].cache = None  # only its memory is kept

    def reduced() -> None:
        last["m"] = prefill(model, ids, dev)

    def switch(on: bool) -> None:
        if on:
            last.pop("m", None)  # the previous reduced cache, freed before the next prefill
            apply(model, method)
            state["attention"] = model.config._attn_implementation
        else:
            remove(model)

    t = interleave(base, reduced, 1, cfg.llm_runs, cfg.llm_warmup, between=switch)
    red = last.pop("m")
    kv = _kv(red.cache, ids.shape[1], model.config.num_hidden_layers)
    steps_base = decode(model, hd.fork_cache(ref.cache), ref.first, cfg.decode_tokens, dev)
    with patched(model, method):  # a reduced cache is read with the model patched
        steps = decode(model, red.cache, red.first, cfg.decode_tokens, dev)
    mem, mem_base = _memory(red), _memory(base_peaks[0])
    ratio = None
    if mem["peak_extra_mb"] is not None and mem_base["peak_extra_mb"]:
        ratio = mem["peak_extra_mb"] / mem_base["peak_extra_mb"]
    d, db = statistics.median(steps), statistics.median(steps_base)
    return {
        **kv,
        **mem,
        "base_peak_extra_mb": mem_base["peak_extra_mb"],
        "peak_ratio": ratio,
        "prefill_ms": 1e3 * t.reduced_s,
        "prefill_base_ms": 1e3 * t.base_s,
        "prefill_speedup": t.ratio,
        "prefill_iqr": list(t.iqr) if t.iqr else None,
        "prefill_pair_ratios": list(t.ratios),
        "other_load": t.other_load,
        "decode_ms": 1e3 * d,
        "decode_base_ms": 1e3 * db,
        "decode_speedup": db / d,
        "attention": state.get("attention"),
        "extra_forwards": method.extra_forwards(ids.shape[1]),
    }


def run(cfg: GpuBenchConfig, dev: Device, clock: Clock, rec: Recorder) -> None:
    """Every model, context and method (the unpatched model first, per context)."""
    for spec in cfg.lms:
        if clock.spent():  # not even the model is built
            rec.add(
                {
                    "part": PART,
                    "model": spec.label,
                    "skipped": f"time limit ({clock.limit / 60:g} min) reached",
                }
            )
            continue
        model = build_lm(spec, cfg, dev)
        for n in cfg.contexts:
            _context(spec, model, n, cfg, dev, clock, rec)
            dev.free()
        del model
        dev.free()


def _context(
    spec: LMSpec,
    model: nn.Module,
    n: int,
    cfg: GpuBenchConfig,
    dev: Device,
    clock: Clock,
    rec: Recorder,
) -> None:
    """One model at one context length: the unpatched row, then a row per method."""
    g = torch.Generator().manual_seed(cfg.seed + n)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(dev.torch)
    key = {
        "part": PART,
        "model": spec.label,
        "context": n,
        "dtype": cfg.llm_dtype,
        "decode_tokens": cfg.decode_tokens,
    }
    ref: list[Prefill] = []

    def unreduced() -> dict[str, Any]:
        ref.append(baseline(model, ids, cfg, dev))
        return base_row(model, ids, ref[0], cfg, dev)

    attempt(
        rec,
        clock,
        dev,
        model,
        {**key, "label": "unreduced", "method": None, "ratio": 0.0},
        unreduced,
    )
    if not ref:
        return  # the unpatched model failed or ran out of time: nothing to compare with
    for kv in cfg.kv_methods:
        run = functools.partial(method_row, model, ids, ref[0], make_method(kv, cfg), cfg, dev)
        attempt(
            rec,
            clock,
            dev,
            model,
            {
                **key,
                "label": kv.label,
                "method": kv.method,
                "params": dict(kv.params),
                "ratio": cfg.kv_ratio,
            },
            run,
        )
