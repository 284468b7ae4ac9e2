"""The LLM bench's Markdown report and the ranking of methods per budget."""

from __future__ import annotations

from typing import Any

from .parallel import worker_threads
from .runner import PPL_PREFIX, LLMBenchConfig
from .trials import ANSWER_PREFIX, QUESTION

#: (key, label, higher is better) of the quality measures ranked per budget
MEASURES = (
    ("needle_agnostic", "needle (query-agnostic)", True),
    ("needle_aware", "needle (query-aware)", True),
    ("ppl_ratio", "perplexity (query-agnostic)", False),
    ("ppl_ratio_aware", "perplexity (query-aware)", False),
)


def cost_context(speed_context: int, trials: list[dict[str, Any]]) -> int:
    """The context length at which a row states its scoring cost (extra forwards): the
    timed one, else the longest context of the trials."""
    return speed_context or max((t["context"] for t in trials), default=0)


COLUMNS: list[tuple[str | tuple[str, str], str]] = [
    ("method", "method"),
    ("budget", "budget"),
    ("prefill_mode", "prefill"),
    ("trials", "trials"),
    (("needle_agnostic", "needle_agnostic_se"), "needle (agnostic)"),
    (("needle_aware", "needle_aware_se"), "needle (aware)"),
    ("needle_lengths", "agnostic by length"),
    (("ppl_ratio", "ppl_ratio_se"), "ppl ratio (agnostic)"),
    (("ppl_ratio_aware", "ppl_ratio_aware_se"), "ppl ratio (aware)"),
    ("kv_kept", "KV kept"),
    ("kv_final_ratio", "KV final"),
    ("kv_peak_ratio", "KV peak"),
    ("prefill_time", "prefill time"),
    ("extra_forwards", "extra forwards"),
    ("decode_ratio", "decode speed"),
]


def _fmt(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if se is None else f"{v:.3f} ± {se:.3f}"


def winners(rows: list[dict[str, Any]]) -> str:
    """One line per budget: the best configuration on each quality measure, and those whose
    one-standard-error interval overlaps its own (not distinguishable at this sample size)."""
    lines = []
    for f in sorted({r["factor"] for r in rows}):
        at = [r for r in rows if r["factor"] == f]
        parts = []
        for key, label, higher in MEASURES:
            scored = [r for r in at if r.get(key) is not None]
            if not scored:
                continue
            se = lambda r, k=key: r.get(f"{k}_se") or 0.0  # noqa: E731
            best = (max if higher else min)(scored, key=lambda r, k=key: r[k])
            if key.startswith("needle") and best[key] == 0:
                parts.append(f"{label}: none (every configuration at 0)")
                continue
            lo, hi = best[key] - se(best), best[key] + se(best)
            tied = [
                r for r in scored
                if r is not best and (r[key] + se(r) >= lo if higher else r[key] - se(r) <= hi)
            ]  # fmt: skip
            name = lambda r: f"{r['method']} ({r['prefill_mode']})"  # noqa: E731
            text = f"{label}: {name(best)} at {_fmt(best[key], best.get(f'{key}_se'))}"
            if len(tied) > 4:
                text += f", {len(tied)} others within one standard error"
            elif tied:
                text += f" (within one standard error: {', '.join(map(name, tied))})"
            parts.append(text)
        if parts:
            lines.append(f"- **{f:g}x**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _check_text(result: dict[str, Any], cfg: LLMBenchConfig) -> str:
    """The perplexity cross-check, and what a ratio below 1 means once it is checked."""
    chk = result["check"]
    if not chk["checks"]:
        return ""
    diff = chk["max_abs_diff"]
    real = diff is not None and diff < 1e-3
    text = (
        f"**Perplexity cross-check.** For {cfg.ppl_check} trial(s) per one-shot method and "
        "ratio, the perplexity ratio was recomputed with the *unpatched* model over the whole "
        "sequence (context + continuation) through a custom attention function that masks, "
        "per layer and KV head, the context entries the compressed cache did not keep "
        f"(continuation queries only; the prefill is exact). Largest absolute difference "
        f"between the two computations over {chk['checks']} checks: {diff:.2e}"
        + (" (agreement up to rounding).\n\n" if real else " — **they disagree**.\n\n")
    )
    below = [r for r in result["rows"] if (r.get("ppl_ratio") or 2.0) < 1.0]
    if below and real:
        low = min(below, key=lambda r: r["ppl_ratio"])
        sig = [r for r in below if r["ppl_ratio"] + 2 * (r.get("ppl_ratio_se") or 0.0) < 1.0]
        text += (
            f"**Ratios below 1.** {len(below)} configurations have a query-agnostic "
            f"perplexity ratio below 1, {len(sig)} of them by more than two standard errors "
            f"(lowest: {low['method']} {low['budget']} {low['prefill_mode']}, "
            f"{_fmt(low['ppl_ratio'], low.get('ppl_ratio_se'))}). For the one-shot ones the "
            "independent computation reproduces the ratio, so it is real and not an artefact "
            "of the cache path (chunked rows use the same continuation path). A compressed "
            "cache can predict the continuation better: it is the text that follows the "
            "haystack and depends mostly on its last paragraphs, while the evicted entries are "
            "distant and unrelated to it (the pass key sentence, other scenes or sections, the "
            "template's system prompt); without them attention mass no longer goes to "
            "distractors, and this small model predicts the local text slightly better. The "
            "effect is small against the trial-to-trial spread, which is why the standard "
            "errors are shown.\n\n"
        )
    return text


def markdown(cfg: LLMBenchConfig, result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The Markdown report of a run."""
    from .. import report

    b = result["base"]
    lengths = " · ".join(
        f"{k}: {v['mean']:.2f} ± {v['se']:.2f} (n={v['n']})"
        for k, v in b["needle_by_length"].items()
    )
    rows = result["rows"]
    notes = (
        f"{cfg.model}, {len(result['trials'])} needle trials ({cfg.trials} per haystack length "
        f"{', '.join(map(str, cfg.lengths))} tokens, depths spread over 0.1–0.9, corpora "
        f"{', '.join(cfg.corpora)} in turn), continuation {cfg.continuation} tokens. Each "
        "trial is a user turn of the model's chat template: the context (template prefix + "
        "haystack with the pass key) is compressed before the question is seen "
        "(query-agnostic) or together with it (query-aware); the question "
        f"{QUESTION.strip()!r}, the end of the user turn and the answer prefix "
        f"{ANSWER_PREFIX!r} are then fed, and a trial is correct when greedy decoding of up "
        f"to {cfg.max_new_tokens} tokens contains the key. Needle accuracy is shown as mean ± "
        "standard error sqrt(p(1-p)/n); perplexity ratios ± their standard error over "
        "trials (delta method on per-trial log ratios)."
        + ("" if cfg.aware else " The query-aware modes were not run (`bench.aware=false`).")
        + "\n\n"
        f"Uncompressed model in the same run: needle {_fmt(b['needle_agnostic'])} ± "
        f"{b['needle_agnostic_se'] or 0:.3f} (agnostic) / {_fmt(b['needle_aware'])} (aware); "
        f"by length {lengths}; perplexity {_fmt(b['ppl'])} (agnostic) / "
        f"{_fmt(b['ppl_aware'])} (aware).\n\n"
        "KV kept = fraction of the context's entries held, over every layer and KV head "
        "(one-shot rows: the budget the method spent); "
        "ratios are against the uncompressed model: KV final/peak = cache bytes, empty slots "
        "included (heads that keep different numbers, AdaKV and KVzip's global ranking, pad "
        "their layer to its fullest head; peak = the "
        "most held at once during the prefill); prefill time = patched / unpatched prefill "
        + (
            f"time of one {result['speed_context']}-token context, median of "
            f"{cfg.timing_runs} interleaved pairs with the interquartile range (min–max under "
            "4 pairs) in parentheses (< 1 is faster), measured after the trials with nothing "
            "else running in the process"
            if result["speed_context"]
            else "time: not measured in this run (no `speed` task)"
        )
        + (
            f"; the trials ran on {cfg.workers} worker processes of "
            f"{worker_threads(int(meta['machine']['torch_threads']), cfg.workers)} thread(s) "
            "each"
            if cfg.workers > 1
            else f"; the trials ran on {len(meta['ranks'])} ranks (listed at the end), the "
            "timings on rank 0 alone"
            if meta.get("ranks")
            else ""
        )
        + "; extra forwards = forwards after the prefill that the method's scoring costs "
        f"for a {cost_context(result['speed_context'], result['trials'])}-token context (KVzip's "
        "context reconstruction); decode "
        "speed = reduced / uncompressed tokens per second (> 1 is faster; measured per "
        "configuration where the method changes decoding, TOVA, AdaKV, KVzip and decoder "
        "methods, else per ratio). "
        + (
            f"Chunked prefill: {cfg.chunk}-token chunks, {cfg.window} stabilising tokens (not "
            "for KVzip and AdaKV, which chunked prefill refuses). "
            if cfg.chunked
            else "Chunked prefill was not run (`bench.chunked=false`). "
        )
        + "Perplexity: of the "
        f"continuation after its first {PPL_PREFIX + 1} tokens, given the compressed context "
        f"(agnostic) or the context plus the first {PPL_PREFIX} continuation tokens "
        "compressed together (aware).\n\n"
        + _check_text(result, cfg)
        + "Which method wins:\n\n"
        + winners(rows)
        + "\n"
    )
    columns = [c for c in COLUMNS if cfg.aware or "aware" not in str(c[0])]
    md = report.markdown(rows, columns, meta, f"tokenmerge bench: {cfg.model}", notes)
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
    return md
