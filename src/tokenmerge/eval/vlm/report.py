"""The VLM bench's Markdown report (a table per budget, the winners, which question type breaks
first, whether counting suffers most from merging) and its plot (accuracy against visual tokens
kept, one panel per question type).

The video task's report is the same over the clips' question types, with budgets as the % of
each clip's visual tokens kept (and no counting section: it asks about the images' count
questions). The question types and their chance come with the result (``result["chance"]``,
in the data's order)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .scenes import KINDS

#: methods that merge (average) visual tokens rather than only drop them: pooling, merges,
#: VisionZip's and Recoverable Compression's merged contextual tokens, HoliTom's inner merge
MERGING = frozenset(
    {"downsample_proj", "m3_proj", "aim_merge", "visionzip_proj", "recoverable", "holitom_inner"}
)
#: a question type "breaks" at the first budget where the median method keeps less than this
#: share (in %) of the unreduced model's accuracy on it
BREAK_PCT = 90.0


def columns(kinds: Sequence[str] = KINDS) -> list[tuple[str | tuple[str, str], str]]:
    """The per-budget table's columns, with a per-type accuracy column for each of `kinds`."""
    return [
        ("method", "method"),
        ("site", "site"),
        (("acc", "acc_se"), "accuracy"),
        ("pct_text", "% of full"),
        (("agreement", "agreement_se"), "agreement"),
        *[(f"acc_{k}", k) for k in kinds],
        ("tokens_text", "tokens"),
        (("ttft_ratio", "ttft_iqr"), "TTFT ratio"),
        (("decode_ratio", "decode_iqr"), "decode speed"),
        ("kv_mb", "KV MB"),
        ("flops_ratio", "FLOPs"),
    ]


COLUMNS = columns(KINDS)
#: how a budget is named in the text: "85 tokens" (the video report: "50% (1024 tokens)")
Label = Callable[[Any], str]


def _f(v: float | None, se: float | None = None, d: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{d}f}" if se is None else f"{v:.{d}f} ± {se:.{d}f}"


def measured_accuracy(
    row: dict[str, Any], kinds: list[str], n_by_type: dict[str, int]
) -> tuple[float | None, float | None]:
    """Accuracy over the questions of `kinds` only (from the per-type accuracies, weighted by
    their question counts), with its binomial standard error."""
    n = sum(n_by_type.get(k, 0) for k in kinds if row.get(f"acc_{k}") is not None)
    if not n:
        return None, None
    p = sum(row[f"acc_{k}"] * n_by_type[k] for k in kinds if row.get(f"acc_{k}") is not None) / n
    return p, (p * (1 - p) / n) ** 0.5


def _tokens(keep: Any) -> str:
    return f"{keep} tokens"


def winners(
    rows: list[dict[str, Any]],
    chance: dict[str, float] | None = None,
    n_by_type: dict[str, int] | None = None,
    kinds: Sequence[str] = KINDS,
    label: Label = _tokens,
) -> str:
    """One line per budget: the most accurate method, and those within one standard error.

    With `chance` and `n_by_type`, accuracy is taken over the question types (of `kinds`) the
    unreduced model answers above chance only (:func:`near_chance`): on the others any answer
    is a guess, and their noise would pick the winner."""
    if not rows or rows[0]["method"] != "unreduced":
        return ""
    skip = near_chance(rows, chance, kinds) if chance is not None and n_by_type is not None else []
    kinds = [k for k in kinds if k not in skip]
    measured = bool(skip and kinds)

    def acc(r: dict[str, Any]) -> tuple[float | None, float | None]:
        if measured:
            return measured_accuracy(r, kinds, n_by_type or {})
        return r.get("acc"), r.get("acc_se")

    lines = []
    if measured:
        lines.append(
            f"Ranked by accuracy on {', '.join(kinds)} only (the unreduced model: "
            f"{_f(acc(rows[0])[0])}); {', '.join(skip)} left out, answered at chance.\n"
        )
    base = acc(rows[0])[0]
    for keep in sorted({r["keep"] for r in rows if r["method"] != "unreduced"}, reverse=True):
        at = [(r, *acc(r)) for r in rows if r["keep"] == keep and r.get("acc") is not None]
        at = [(r, a, se) for r, a, se in at if a is not None]
        if not at:
            continue
        best, a, se = max(at, key=lambda x: (x[1], x[0]["agreement"]))
        lo = a - (se or 0.0)
        tied = [r["method"] for r, a2, se2 in at if r is not best and a2 + (se2 or 0) >= lo]
        cheap = min((x[0] for x in at), key=lambda r: r["flops_ratio"])
        pct = 100 * a / base if base else None
        text = (
            f"- **{label(keep)}**: {best['method']} at {_f(a, se)} "
            f"({_f(pct, d=0)}% of full, agreement {_f(best['agreement'], d=2)})"
        )
        text += f"; within one standard error: {', '.join(tied)}" if tied else "; alone"
        text += f". Fewest FLOPs: {cheap['method']} ({_f(cheap['flops_ratio'], d=2)})."
        lines.append(text)
    return "\n".join(lines)


def retention(
    rows: list[dict[str, Any]], kinds: Sequence[str] = KINDS
) -> dict[str, dict[float, float | None]]:
    """Per question type (of `kinds`) and budget: the median over methods of the % of the
    unreduced model's accuracy on that type."""
    import statistics

    keeps = sorted({r["keep"] for r in rows if r["method"] != "unreduced"}, reverse=True)
    out: dict[str, dict[float, float | None]] = {}
    for k in kinds:
        out[k] = {}
        for keep in keeps:
            at = [r for r in rows if r["keep"] == keep and r["method"] != "unreduced"]
            vals = [r[f"pct_{k}"] for r in at if r.get(f"pct_{k}") is not None]
            out[k][keep] = statistics.median(vals) if vals else None
    return out


def near_chance(
    rows: list[dict[str, Any]], chance: dict[str, float], kinds: Sequence[str] = KINDS
) -> list[str]:
    """Question types (of `kinds`) on which the unreduced model is no better than chance
    (+ 5 points): there is nothing for a reduction to break."""
    base = rows[0]
    return [
        k for k in kinds
        if base.get(f"acc_{k}") is None or base[f"acc_{k}"] <= chance.get(k, 0.0) + 0.05
    ]  # fmt: skip


def breaks_first(
    rows: list[dict[str, Any]],
    chance: dict[str, float] | None = None,
    kinds: Sequence[str] = KINDS,
    label: Label | None = None,
) -> str:
    """Which question type (of `kinds`) falls below :data:`BREAK_PCT` % of its unreduced
    accuracy first (at the largest budget), as a sentence. Types the unreduced model answers
    at chance are left out. `label` names a budget (default: "85 tokens", and the later
    breaks bare: "count at 28")."""
    ret = retention(rows, kinds)
    skip = near_chance(rows, chance or {}, kinds)
    name, then = (_tokens, str) if label is None else (label, label)
    note = (
        f" Left out: {', '.join(skip)} (the unreduced model is within 5 points of chance)."
        if skip
        else ""
    )
    ret = {k: v for k, v in ret.items() if k not in skip}
    if not ret:
        return "Not measurable: the unreduced model answers every type at chance." + note
    broke: dict[str, float] = {}
    for k, per in ret.items():
        for keep, v in per.items():  # largest budget first
            if v is not None and v < BREAK_PCT:
                broke[k] = keep
                break
    if not broke:
        return (
            f"No question type breaks: at every budget the median method keeps at least "
            f"{BREAK_PCT:g}% of the unreduced accuracy on every type." + note
        )
    first = max(broke.values())
    at = sorted((k for k in broke if broke[k] == first), key=lambda k: ret[k][first])
    rest = ", ".join(
        f"{k} at {then(v)}" for k, v in sorted(broke.items(), key=lambda x: -x[1]) if k not in at
    )
    held = [k for k in ret if k not in broke]  # the measured types that never broke
    verb = "breaks" if len(at) == 1 else "break"
    return (
        f"**{', '.join(at)}** {verb} first: at {name(first)} the median method keeps "
        f"{ret[at[0]][first]:.0f}% of the unreduced accuracy on it (below {BREAK_PCT:g}%)."
        + (f" Then: {rest}." if rest else "")
        + (f" Never below {BREAK_PCT:g}%: {', '.join(held)}." if held else "")
        + note
    )


def counting(
    rows: list[dict[str, Any]], n_by_type: dict[str, int], chance: dict[str, float] | None = None
) -> str:
    """The answer to "does counting suffer most from merging?", computed from the rows: the mean
    % of unreduced accuracy kept per type, over the merging methods and all budgets, against
    the pruning methods'."""

    def mean_pct(methods: set[str], kind: str) -> float | None:
        vals = [r[f"pct_{kind}"] for r in rows if r["method"] in methods
                and r.get(f"pct_{kind}") is not None]  # fmt: skip
        return sum(vals) / len(vals) if vals else None

    ran = {r["method"] for r in rows if r["method"] != "unreduced" and r.get("acc") is not None}
    merging, pruning = ran & MERGING, ran - MERGING
    if "count" in near_chance(rows, chance or {}):
        return (
            "Does counting suffer most from merging? Not measurable: the unreduced model "
            "answers count questions at chance."
        )
    if not merging:
        return "Does counting suffer most from merging? Not measured: no merging method was run."
    per = {k: mean_pct(merging, k) for k in KINDS}
    per = {k: v for k, v in per.items() if v is not None}
    if "count" not in per:
        return "Does counting suffer most from merging? Not measured: no count question scored."
    worst = min(per, key=per.get)
    others = ", ".join(f"{k} {v:.0f}%" for k, v in per.items() if k != "count")
    prune = mean_pct(pruning, "count") if pruning else None
    n = n_by_type.get("count", 0)
    answer = "Yes" if worst == "count" else "No"
    text = (
        f"**Does counting suffer most from merging? {answer}.** Averaged over the merging "
        f"methods ({', '.join(sorted(merging))}) and every budget, counting keeps "
        f"{per['count']:.0f}% of its unreduced accuracy; the other types: {others}"
        + ("" if worst == "count" else f" (lowest: {worst})")
        + "."
    )
    if prune is not None:
        text += (
            f" Under the pruning methods ({', '.join(sorted(pruning))}) counting keeps "
            f"{prune:.0f}%, so merging is {'worse' if per['count'] < prune else 'no worse'} "
            "for counting than pruning here."
        )
    return text + (
        f" With {n} count questions, one question is {100 / max(n, 1):.0f} points of accuracy: "
        "differences of a few points are noise."
    )


def markdown(cfg: Any, result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The Markdown report of a run (of the video task with ``cfg.video``)."""
    from .. import report

    rows, base = result["rows"], result["rows"][0]
    n_by, chance = result["n_by_type"], result["chance"]
    kinds = list(chance)  # the data's question types, in its order
    video = cfg.video
    label = _pct_label(cfg) if video else _tokens
    counts = ", ".join(f"{k} {v}" for k, v in n_by.items())
    chances = ", ".join(f"{k} {v:.2f}" for k, v in chance.items())
    per_type = ", ".join(f"{k} {_f(base.get(f'acc_{k}'), d=2)}" for k in kinds)
    load = result.get("other_load")
    if video:
        title = (
            f"# tokenmerge bench: {cfg.model}, video task (visual token reduction on "
            f"{cfg.frames}-frame clips)\n"
        )
        data = (
            f"{cfg.model}: video clips of {cfg.frames} frames, {cfg.n_image} visual tokens per "
            f"frame given back to back, {cfg.n_visual} per clip, which the adapter reduces as "
            f"one clip. {sum(n_by.values())} held-out questions about what happens in a clip "
            f"({cfg.split} split of the synthetic clips, seed {cfg.seed}; per type: "
        )
        budgets = (
            "Budgets are the % of each clip's visual tokens kept ("
            + ", ".join(f"{k:g}% = {cfg.tokens(k):g} tokens" for k in cfg.keeps)
            + "), i.e. ratio = 1 - pct/100 of the whole clip, which a method may spread "
            "unevenly over the frames. Frame subsampling keeps whole frames "
            "(round(frames·pct/100), at least one), so its count is the nearest whole number "
            "of frames. Projector methods reduce every clip once, before the LLM; HoliTom then "
            "merges again inside it (its in-LLM stage removes half of what entered, from layer "
            "18/28 of the depth on), so its tokens column is the last layer's. Decoder methods "
            "remove the same fraction of the clip's tokens by layer K=2 (FastV prunes at K; "
            "FrameFusion merges adjacent frames' tokens at layers 0 and 1, up to the budget, "
            "and prunes the rest at K): they run the first layers on more tokens, so at equal "
            "kept tokens their FLOPs are higher.\n\n"
        )
        unit, tokens_note, fixed = (
            "clip",
            "pooling methods keep what their grids give, frame subsampling whole frames",
            "the unchanged vision tower and projector on every frame, and the LM head",
        )
    else:
        title = f"# tokenmerge bench: {cfg.model} (visual token reduction)\n"
        data = (
            f"{cfg.model}: {cfg.n_image} visual tokens per image. {sum(n_by.values())} held-out "
            f"questions ({cfg.split} split of the synthetic scenes, seed {cfg.seed}; per type: "
        )
        budgets = (
            "Budgets are visual tokens kept per image (LLaVA's 576 -> 192/128/64 scaled to "
            f"{cfg.n_image}, plus an extreme one), i.e. ratio = 1 - keep/{cfg.n_image}. "
            "Projector methods reduce every image once, before the LLM. Decoder methods (FastV "
            "and HoliTom's inner merge at layer K=2, AIM's progressive pruning from layer "
            "depth/2 to 3·depth/4) remove the same fraction of the image tokens from layer K "
            "on: they run the first layers on every token, so at equal kept tokens their FLOPs "
            "are higher.\n\n"
        )
        unit, tokens_note, fixed = (
            "image",
            "pooling methods keep what their grid gives",
            "the unchanged vision tower, projector and LM head",
        )
    notes = (
        data + f"{counts}; the list is in the JSON's `meta.questions`), answered by greedy "
        f"decoding (up to {cfg.max_new_tokens} tokens, batches of up to {cfg.batch_size} "
        + (
            "questions whose prompts have the same length, so no padding"
            if getattr(cfg, "same_length", False)
            else "questions, left-padded"
        )
        + ") and scored by first word against the gold answer. Chance per type: "
        f"{chances}.\n\nUnreduced model: accuracy {_f(base.get('acc'), base.get('acc_se'))}; "
        f"per type {per_type}.\n\n"
        + budgets
        + "Columns: accuracy ± sqrt(p(1-p)/n); % of full = accuracy / the unreduced accuracy "
        "(± bootstrap SE over questions, paired); agreement = share of answers equal to the "
        "unreduced model's (± bootstrap SE); per-type accuracy; tokens = visual tokens the "
        f"last LLM layer held per {unit}, read from the runtime ({tokens_note}); TTFT ratio = "
        "patched / unpatched time to the first token (< 1 is faster) and decode speed = "
        "patched / unpatched tokens per second after it (> 1 is faster), one question at batch "
        f"1, median of {cfg.timing_runs} interleaved pairs with the interquartile range "
        "(min–max under 4 pairs); a range holding 1.0 is no measurable change; KV MB = cache "
        "bytes per question after the prefill; FLOPs = analytic prefill FLOPs / the unreduced "
        f"model's (LLM layers at the token counts they ran on, plus {fixed}).\n\n"
        + (
            f"Timing load: other processes kept {load:.2f} cores busy at most "
            f"(mean {result.get('other_load_mean') or 0:.2f}) during the timed pairs"
            + (" — **loaded**, the speed columns are noisy.\n\n" if load > 0.25 else ".\n\n")
            if load is not None
            else ""
        )
    )
    parts = [title, notes]
    parts += ["## Which method wins\n", winners(rows, chance, n_by, kinds, label), ""]
    broke = breaks_first(rows, chance, kinds, label if video else None)
    parts += ["## Which question type breaks first\n", broke, ""]
    parts += [_ret_table(rows, kinds, label)]
    if not video:  # a question about the images' count questions
        parts += ["## Counting and merging\n", counting(rows, n_by, chance), ""]
    for keep in sorted({r["keep"] for r in rows[1:]}, reverse=True):
        at = [base] + [r for r in rows if r["keep"] == keep and r["method"] != "unreduced"]
        at = [_display(r) for r in at]
        head = (
            f"## {keep:g}% of the visual tokens kept ({cfg.tokens(keep):g} of {cfg.n_visual} "
            "per clip)\n"
            if video
            else f"## {keep} visual tokens kept (of {cfg.n_image})\n"
        )
        parts += [head, report.table(at, columns(kinds))]
    parts.append(report.footer(meta))
    return "\n".join(parts)


def _pct_label(cfg: Any) -> Label:
    """The video report's budget names: "50% (1024 tokens)" (per clip)."""
    return lambda pct: f"{pct:g}% ({cfg.tokens(pct):g} tokens)"


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its % of full (± SE) and token count as the table shows them."""
    pct, se = row.get("pct_full"), row.get("pct_full_se")
    text = "" if pct is None else f"{pct:.0f}" + ("" if se is None else f" ± {se:.0f}")
    tokens = row.get("tokens")
    return row | {"pct_text": text, "tokens_text": "" if tokens is None else f"{tokens:.1f}"}


def _ret_table(rows: list[dict[str, Any]], kinds: Sequence[str], label: Label) -> str:
    ret = retention(rows, kinds)
    keeps = list(next(iter(ret.values())).keys())
    head = "| type | " + " | ".join(label(k) for k in keeps) + " |"
    lines = [head, "|" + "---|" * (len(keeps) + 1)]
    for kind, per in ret.items():
        lines.append(f"| {kind} | " + " | ".join(_f(per[k], d=0) for k in keeps) + " |")
    return "Median over methods of the % of unreduced accuracy kept:\n\n" + "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, title: str, video: bool = False) -> None:
    """Accuracy against the visual tokens kept (``video``: the % of each clip's visual tokens
    kept, both as measured): overall and one panel per question type, a line per method
    (dashed: decoder methods), the unreduced model and chance as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("acc") is not None]
    base, methods = rows[0], list(dict.fromkeys(r["method"] for r in rows[1:]))
    n_by, chance = result["n_by_type"], result["chance"]
    kinds = list(chance)  # the data's question types, in its order
    overall = sum(chance[k] * n_by[k] for k in kinds) / max(sum(n_by.values()), 1)
    panels = [("acc", "overall", overall)] + [(f"acc_{k}", k, chance[k]) for k in kinds]
    scale = 100 / base["tokens"] if video else 1.0  # tokens -> % of the clip's tokens
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    for ax, (key, label, chance) in zip(axes.flat, panels, strict=True):
        for i, m in enumerate(methods):
            pts = sorted(
                (r["tokens"] * scale, r[key])
                for r in rows
                if r["method"] == m and r.get(key) is not None
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                dec = any(r.get("site") == "decoder" for r in rows if r["method"] == m)
                ax.plot(
                    xs, ys, marker="os^vD"[i % 5], ls="--" if dec else "-", color=cmap(i), label=m
                )
        if base.get(key) is not None:
            ax.axhline(base[key], color="black", ls="--", lw=1, label="unreduced")
            ax.plot([base["tokens"] * scale], [base[key]], "k*", ms=9)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_title(label)
        ax.set_xlabel(
            "% of the clip's visual tokens kept (measured)"
            if video
            else "visual tokens kept per image (measured)"
        )
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
