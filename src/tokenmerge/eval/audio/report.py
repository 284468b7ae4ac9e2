"""The Whisper bench's Markdown report (a table per budget, the best method per budget, the
data, the first transcript each run changed) and its plot (WER and agreement against the
measured end-to-end speed-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cpuload import LOADED_CORES

#: the per-budget table
COLUMNS: list[tuple[str | tuple[str, str], str]] = [
    ("method", "method"),
    ("tokens_text", "tokens kept (mean ± std, min–max)"),
    ("flops_ratio", "encoder FLOPs"),
    (("wer", "wer_se"), "WER"),
    ("wer_real", "WER real"),
    ("wer_espeak", "WER espeak"),
    (("agreement", "agreement_se"), "agreement"),
    ("wer_vs_unreduced", "WER vs unreduced"),
    (("encoder_ratio", "encoder_iqr"), "encoder speed-up"),
    (("e2e_ratio", "e2e_iqr"), "end-to-end speed-up"),
]


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _tokens_text(row: dict[str, Any]) -> str:
    lo, hi = row["tokens_range"]
    spread = f" ± {row['tokens_std']:.0f}, {lo}–{hi}" if hi > lo else ""
    return f"{row['tokens']:.0f}{spread}"


def _best(rows: list[dict[str, Any]]) -> str:
    """The lowest WER at this budget, and the methods within one standard error of it."""
    best = min(rows, key=lambda r: r["wer"])
    tied = [r["method"] for r in rows if r is not best and r["wer"] - best["wer"] <= best["wer_se"]]
    also = f" (within one SE: {', '.join(tied)})" if tied else ""
    return f"{best['method']} {best['wer']:.3f} ± {best['wer_se']:.3f}{also}"


def markdown(cfg: Any, result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The report of a run."""
    from .. import report

    rows = [dict(r, tokens_text=_tokens_text(r)) for r in result["rows"]]
    base, runs = rows[0], rows[1:]
    data, secs = result["data"], result["data"]["seconds"]
    per = ", ".join(f"{k} {v}" for k, v in data["per_source"].items())
    load = result.get("other_load")
    loaded = (
        f"Other processes took up to {load:.2f} cores (mean {result['other_load_mean']:.2f}) "
        "during the timed runs"
        + (
            " — **the machine was loaded**: read the speed-ups as rough"
            if load > LOADED_CORES
            else ""
        )
        + ".\n\n"
        if load is not None
        else ""
    )
    out = [
        f"# tokenmerge bench: {cfg.model} (token reduction in Whisper's audio encoder)\n",
        f"{data['clips']} clips ({per}), {secs['total']:.0f} s of speech: {secs['min']:.1f}–"
        f"{secs['max']:.1f} s, median {secs['median']:.1f} s. The real clips are the LibriVox "
        "and card-name utterances of Debian's pocketsphinx-testdata; the others are espeak-ng "
        "readings of Austen and Moby-Dick sentences in varied voices. Whisper pads every clip "
        f"to 30 s: its encoder always sees {rows[0]['tokens']:.0f} tokens, mostly silence.\n",
        "Budgets are the tokens left after the encoder's last layer. A method keeps the same "
        f"share in each of the {result['depth']} layers; DToMe is calibrated at the budget on "
        f"{result['calibration_clips']} held-out synthesised clips and then keeps what each "
        "clip needs (its tokens are a mean over clips); `truncate` keeps the first tokens "
        "(a shorter encoder context, whisper.cpp's `audio_ctx`). The decoder's "
        "cross-attention counts each merged token as the frames it stands for (`+log size`).\n",
        "WER is the corpus word error rate against the reference transcripts after a small "
        "normalisation (case, punctuation, Mr/Mrs spelled out), ± a bootstrap standard error "
        "over clips. Agreement: the share of clips whose normalised transcript equals the "
        "unreduced model's; `WER vs unreduced` takes the unreduced transcripts as references. "
        "Encoder FLOPs are analytic (the encoder only). Speed-ups are measured against the "
        f"unpatched model in the same process, interleaved, {cfg.timing_runs} timed pairs "
        f"after {cfg.timing_warmup} warm-up (median, interquartile range), on a batch of "
        f"{result['timing_clips']} clips: the encoder alone, and the whole greedy `generate` "
        f"(at most {cfg.max_new_tokens} new tokens; a run that loops until that limit is "
        "slower end to end).\n",
        loaded,
        f"Unreduced: WER {base['wer']:.3f} ± {base['wer_se']:.3f} (real speech "
        f"{_f(base['wer_real'])}, synthesised {_f(base['wer_espeak'])}).\n",
    ]
    keeps = list(dict.fromkeys(r["budget"] for r in runs))
    out.append("## Best WER per budget\n")
    for k in keeps:
        mine = [r for r in runs if r["budget"] == k]
        out.append(f"- **{k} tokens** ({100 * k / base['tokens']:.1f}%): {_best(mine)}")
    out.append("")
    for k in keeps:
        mine = [r for r in runs if r["budget"] == k]
        out.append(
            f"## {k} tokens kept ({100 * k / base['tokens']:.1f}% of {base['tokens']:.0f})\n"
        )
        out.append(report.table([base, *mine], COLUMNS))
    if result.get("examples"):
        out.append("## The first transcript each run changed\n")
        for key, ex in result["examples"].items():
            out.append(
                f"- `{key}` ({ex['clip']}): “{ex['reduced']}” — unreduced “{ex['unreduced']}”"
            )
        out.append("")
    out.append(report.footer(meta))
    return "\n".join(out)


def plot(cfg: Any, result: dict[str, Any], path: Path) -> None:
    """WER and agreement against the measured end-to-end speed-up, a line per method."""
    from .. import report

    base = result["rows"][0]
    report.pareto_plot(
        result["rows"][1:],
        path,
        [("wer", "WER (lower is better)"), ("agreement", "agreement with unreduced")],
        f"{cfg.model}: quality against end-to-end transcription speed-up",
        base={"wer": base["wer"], "agreement": 1.0},
        errors={"wer": "wer_se", "agreement": "agreement_se"},
    )
