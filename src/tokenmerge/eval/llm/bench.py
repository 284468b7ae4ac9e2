"""``run``: load the model, run every trial and summarise the rows (JSON-ready)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ...adapters import hf_decoder as hd
from ...methods import REGISTRY
from ...methods.kv.kvzip import kvzip_prompt
from ..distributed import Group, launched, machine
from .measure import Acc, mean, ppl_ratio, proportion
from .parallel import run_trials, share_trials
from .report import cost_context
from .runner import TASKS, LLMBenchConfig, Runner, all_factors
from .trials import Trial, make_trials, spread


def validate(cfg: LLMBenchConfig) -> None:
    """Refuse a configuration before anything loads (the CLI calls it before its progress
    bar starts)."""
    from ..corpora import CORPORA

    unknown = set(cfg.tasks) - TASKS
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; accepted: {sorted(TASKS)}")
    bad = [c for c in cfg.corpora if c not in CORPORA]
    if bad or not cfg.corpora:
        raise ValueError(f"unknown corpora {bad}; accepted: {', '.join(CORPORA)}")
    for m in cfg.methods:
        if m not in REGISTRY or REGISTRY[m].site not in ("kv", "decoder"):
            llm = sorted(n for n, c in REGISTRY.items() if c.site in ("kv", "decoder"))
            raise ValueError(f"{m!r} is not a KV or decoder method; choose from {llm}")
    if any(f < 1.0 for f in all_factors(cfg)):
        raise ValueError(f"compression factors must be >= 1 (2 = 2x), got {all_factors(cfg)}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be at least 1, got {cfg.workers}")
    if cfg.workers > 1 and launched():
        raise ValueError(
            "bench.workers forks worker processes; under torchrun or accelerate launch the "
            "ranks already share the trials: leave bench.workers at 1"
        )
    if cfg.trials < 1 or not cfg.lengths:
        raise ValueError("the bench needs at least one length and one trial per length")


def with_prompts(cfg: LLMBenchConfig, tok: Any) -> LLMBenchConfig:
    """KVzip's reconstruction prompt from the model's tokenizer, unless one is configured."""
    params = {k: dict(v) for k, v in cfg.method_params.items()}
    if "kvzip" in cfg.methods:
        params.setdefault("kvzip", {}).setdefault("prompt", kvzip_prompt(tok))
    ada = params.get("adakv", {})
    if "adakv" in cfg.methods and ada.get("scorer") == "kvzip":
        ada["scorer_params"] = {"prompt": kvzip_prompt(tok), **ada.get("scorer_params", {})}
    return dataclasses.replace(cfg, method_params=params)


def run(
    cfg: LLMBenchConfig, progress: Callable[[int], None] | None = None, grp: Group | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows", "base", "check", "memory", "trials", "ranks",
    ...}`` (:func:`summarize`).

    Under a launcher, ``grp``'s ranks share the trials (:func:`.parallel.share_trials`); the
    timings and memory then run on rank 0 alone, against its own unpatched model, and only
    rank 0 gets the result (the others ``{}``)."""
    grp = grp or Group()
    from .. import zoo

    validate(cfg)
    tick = progress or (lambda k: None)
    torch.manual_seed(cfg.seed)
    model, tok = zoo.load_causal_lm(cfg.model)
    hd.DecoderAdapter().target(model)  # refuse an unsupported model before any work
    cfg = with_prompts(cfg, tok)
    r = Runner(cfg, model, tok, tick)
    trials = make_trials(tok, cfg.lengths, cfg.trials, cfg.corpora, cfg.continuation, cfg.seed)
    if cfg.tasks & {"needle", "ppl"}:
        checked = set(spread(len(trials), cfg.ppl_check))
        if grp.world > 1:
            share_trials(r, trials, checked, grp)
        elif cfg.workers > 1:
            run_trials(r, trials, checked, cfg.workers)
        else:
            for i, t in enumerate(trials):
                r.trial(t, check=i in checked)
    ranks = grp.gather(machine(grp))
    if not grp.main:
        return {}
    speed, speed_ctx = None, 0
    if "speed" in cfg.tasks:
        st = make_trials(tok, [cfg.speed_length], 1, cfg.corpora[:1], 1, cfg.seed + 1)[0]
        speed, speed_ctx = r.speed(st), st.context.shape[1]
    memory = []
    if "memory" in cfg.tasks:
        mt = make_trials(tok, cfg.memory_lengths, 1, cfg.corpora[:1], 1, cfg.seed + 2)
        memory = r.memory({t.length: t for t in mt})
    return summarize(cfg, r, trials, speed, speed_ctx, memory) | {"ranks": ranks}


def _needle(acc: Acc) -> dict[str, Any]:
    p, se, n = proportion(acc.agnostic)
    pa, sea, _ = proportion(acc.aware)
    by = acc.by_length()
    return {
        "trials": n,
        "needle_agnostic": p,
        "needle_agnostic_se": se,
        "needle_aware": pa,
        "needle_aware_se": sea,
        "needle_by_length": {k: {"mean": m, "se": s, "n": c} for k, (m, s, c) in by.items()},
        "needle_lengths": " · ".join(f"{k}: {m:.2f} ± {s:.2f}" for k, (m, s, _) in by.items()),
    }


def _check_summary(checks: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, float] = {}
    for c in checks:
        per[c["method"]] = max(per.get(c["method"], 0.0), c["diff"])
    return {
        "max_abs_diff": max(per.values()) if per else None,
        "checks": len(checks),
        "by_method": per,
        "rows": checks,
    }


def summarize(
    cfg: LLMBenchConfig,
    r: Runner,
    trials: list[Trial],
    speed: dict[str, Any] | None,
    speed_ctx: int,
    memory: list[dict[str, Any]],
) -> dict[str, Any]:
    """The result: one row per (method, factor, prefill mode), the uncompressed baseline,
    the perplexity check, memory and the trials."""
    from .. import report

    b = r.base
    info = [
        {"corpus": t.corpus, "length": t.length, "depth": round(t.depth, 4), "key": t.key,
         "context": t.context.shape[1], "answer": ans, "correct": ok}
        for t, ans, ok in zip(trials, b.answers or [None] * len(trials),
                              b.agnostic or [None] * len(trials), strict=True)
    ]  # fmt: skip
    cost_ctx = cost_context(speed_ctx, info)
    ppl = lambda nll, n: math.exp(sum(nll) / sum(n)) if n and sum(n) else None  # noqa: E731
    base = _needle(b) | {
        "ppl": ppl(b.nll, b.tokens),
        "ppl_aware": ppl(b.nll_aware, b.tokens_aware),
    }
    rows = []
    # a configuration only timed (no needle or perplexity task) still gets its row
    timed = speed["prefill"] if speed is not None else {}
    accs = {**{k: Acc() for k in timed}, **r.accs}
    for (name, f, mode), a in accs.items():
        m = r.method(name, f)
        ratio, ratio_se = ppl_ratio(a.nll, a.tokens, b.nll, b.tokens)
        aware, aware_se = ppl_ratio(a.nll_aware, a.tokens_aware, b.nll_aware, b.tokens_aware)
        row = {
            "model": cfg.model,
            "method": name,
            "factor": f,
            "budget": f"{f:g}x",
            "prefill_mode": mode,
            "params": report.method_params(m, f"{f:g}x"),
            **_needle(a),
            "ppl": ppl(a.nll, a.tokens),
            "ppl_ratio": ratio,
            "ppl_ratio_se": ratio_se,
            "ppl_aware": ppl(a.nll_aware, a.tokens_aware),
            "ppl_ratio_aware": aware,
            "ppl_ratio_aware_se": aware_se,
            "kv_final_ratio": mean(a.kv_final),
            "kv_kept": mean(a.kv_kept) if a.kv_kept else None,
            "kv_peak_ratio": mean(a.kv_peak),
            "extra_forwards": m.extra_forwards(cost_ctx) if mode == "oneshot" else 0,
            "prefill_ratio": None,
            "prefill_ratio_lo": None,
            "prefill_ratio_hi": None,
            "prefill_time": None,
            "decode_ratio": None,
        }
        if speed is not None:
            med, lo, hi = speed["prefill"].get((name, f, mode), (None, None, None))
            if med is not None:
                row |= {"prefill_ratio": med, "prefill_ratio_lo": lo, "prefill_ratio_hi": hi,
                        "prefill_time": f"{med:.2f} ({lo:.2f}–{hi:.2f})"}  # fmt: skip
            d = speed["decode"]
            own = d.get((name, f, mode)) or d.get((name, f, "oneshot"))
            row["decode_ratio"] = own if own or mode == "prefill" else d.get(("kv", f))
            if mode == "oneshot":
                row["kv_peak_ratio"] = speed["peak"].get((name, f))
        rows.append(row)
    order = {m: i for i, m in enumerate(cfg.methods)}
    modes = {"oneshot": 0, "chunked": 1, "prefill": 2}
    rows.sort(key=lambda x: (order[x["method"]], modes[x["prefill_mode"]], x["factor"]))
    return {
        "rows": rows,
        "base": base,
        "check": _check_summary(r.checks),
        "memory": memory,
        "trials": info,
        "speed_context": speed_ctx,
        "method_params": cfg.method_params,  # with the prompts built from the tokenizer
    }
