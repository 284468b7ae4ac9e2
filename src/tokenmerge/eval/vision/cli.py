"""``tokenmerge bench`` for vision models: arguments to a :class:`.VisionBenchConfig`, and the
report (JSON, Markdown with one table per dataset hardest first, a Pareto plot)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import distributed, report
from ..baselines import MATCHED, POINTS, matched_speed, parse_baselines
from . import explain
from .measure import (
    DATASETS,
    TASKS,
    VisionBenchConfig,
    check_datasets,
    difficulty,
    hardest_first,
    run,
)

#: ``--quick``: the CI smoke test, two datasets of 64 images each
QUICK = {
    "dataset": "textiles,photos",
    "n": 64,
    "budgets": "8,16",
    "timing_runs": 3,
    "saliency_images": 16,
    "batch_size": 16,
}
#: the default run, the main job: a quick look in about 5 minutes on 2 quiet cores (three
#: datasets of 96 images, ToMe at r=8 and 16, both baselines; agreement SEs of 0.02-0.05)
DEFAULT = {
    "n": 96,
    "budgets": "8,16",
    "timing_runs": 5,
    "saliency_images": 32,
    "batch_size": 32,
}
#: ``--full``: the published size (n=1000 keeps an agreement's standard error at most 0.01
#: wherever it is at least 0.9), about an hour on 2 cores
FULL = {
    "n": VisionBenchConfig.n,
    "budgets": "8,12,16,20",
    "timing_runs": 5,
    "saliency_images": 64,
    "batch_size": 32,
}
#: downsampling's input sizes, in patches fewer per side than the model's, per preset
STEPS = {"quick": (2, 4), "default": (2, 4), "full": VisionBenchConfig.downsample_steps}
#: an agreement whose standard error is above this is flagged in the report (n = 1000 keeps
#: it below whenever the agreement is at least 0.9)
SE_LIMIT = 0.01

COLUMNS: list[tuple[str | tuple[str, str], str]] = [
    ("method", "method"),
    ("budget", "budget"),
    (("throughput_ratio", "throughput_iqr"), "speed-up (IQR)"),
    ("timing", "timing"),
    ("flops_ratio", "FLOPs"),
    ("cosine", "cos"),
    (("cosine_p05", "cosine_p05_se"), "cos p05"),
    (("knn_drop", "knn_drop_se"), "k-NN drop"),
    (("knn_agreement", "knn_agreement_se"), "k-NN agree"),
    (("probe_drop", "probe_drop_se"), "probe drop"),
    (("agreement", "agreement_se"), "probe agree"),
    ("saliency_r", "saliency r"),
    ("saliency_iou", "top-10% IoU"),
    *((f"vs_downsample_{key}", f"{name} vs downsampling") for key, name in MATCHED),
    *((f"vs_tome_{key}", f"{name} vs ToMe") for key, name in MATCHED),
    ("tokens_per_layer", "tokens after each layer"),
]
#: the standard errors flagged above :data:`SE_LIMIT`
FLAGS = {"agreement_se": SE_LIMIT, "knn_agreement_se": SE_LIMIT}
#: the plot's rows of panels (the measures with statistical power at the run's n: the
#: accuracies' own drops are noise next to them), and each one's error bar
PLOTTED = [
    ("agreement", "probe agreement (higher: better)"),
    ("cosine_p05", "CLS cosine p05 (higher: better)"),
]
ERRORS = {"agreement": "agreement_se", "cosine_p05": "cosine_p05_se"}


def parse_datasets(spec: str | None) -> tuple[str, ...]:
    """``"textiles,photos"`` -> ``("textiles", "photos")``; all of :data:`DATASETS` if None."""
    if spec is None:
        return DATASETS
    return check_datasets([s.strip() for s in spec.split(",") if s.strip()])


def _sizes(budgets: Sequence[Any]) -> list[int] | None:
    """``--budgets-for downsample=182,168``: input sides in pixels."""
    from ...core.budget import Constant

    if any(not isinstance(b, Constant) for b in budgets):
        raise SystemExit("downsampling budgets are input sides in pixels, e.g. downsample=182,168")
    return [b.r for b in budgets] or None


def parse_speedups(spec: str | None) -> tuple[float, ...]:
    """``"1.5,2"`` -> ``(1.5, 2.0)``: autotune targets (:func:`.run` checks each is above 1)."""
    try:
        return tuple(float(s) for s in (spec or "").split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--autotune takes speed-ups above 1, e.g. 1.5,2; got {spec!r}") from None


def load_plans(paths: Sequence[str] | None) -> dict[str, Any]:
    """``--plan`` files by their stem, each a :class:`~tokenmerge.tune.Plan` JSON."""
    from ...tune.plan import Plan

    plans = {}
    for name in paths or []:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"--plan {name!r}: no such file (write one with `tokenmerge tune`)")
        try:
            plans[path.stem] = Plan.load(path)
        except (ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"--plan {name!r} is not a tokenmerge plan: {e}") from None
    return plans


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for vision models (called by the CLI)."""
    from tqdm import tqdm

    from ...cli.checks import check_methods, parse_method_budgets, parse_params, warn_few_tokens
    from ...core.budget import parse_budget

    preset = "quick" if args.quick else "full" if getattr(args, "full", False) else "default"
    for k, v in {"quick": QUICK, "full": FULL, "default": DEFAULT}[preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    methods = check_methods([m.strip() for m in (args.methods or "tome").split(",")])
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    try:
        baselines = parse_baselines(args.baselines)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    per_method = parse_method_budgets(args.budgets_for or [], accepted=[*methods, *baselines])
    tasks = frozenset(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    cfg = VisionBenchConfig(
        model=args.model,
        backend=args.backend,
        methods=methods,
        budgets=budgets,
        method_budgets=per_method,
        method_params=parse_params(args.param or []),
        datasets=parse_datasets(args.dataset),
        n=args.n,
        batch_size=args.batch_size,
        timing_runs=args.timing_runs,
        saliency_images=args.saliency_images,
        seed=args.seed,
        tasks=tasks,
        baselines=baselines,
        downsample=_sizes(per_method.pop("downsample", [])),
        downsample_steps=STEPS[preset],
        autotune=parse_speedups(args.autotune),
        autotune_methods=[m.strip() for m in (args.autotune_methods or "tome").split(",")],
        autotune_time=args.autotune_time or VisionBenchConfig.autotune_time,
        plans=load_plans(args.plan),
    )
    runs = [(m, b) for m in cfg.methods for b in cfg.method_budgets.get(m, cfg.budgets)]
    warn_few_tokens(cfg.model, runs, cfg.method_params)  # before the model loads

    # the bar starts with the first phase: an argument run() refuses leaves one line on stderr
    bars: list[tqdm] = []

    def bar() -> tqdm:
        if not bars:
            bars.append(tqdm(desc="bench", unit="img", file=sys.stderr))
        return bars[0]

    def plan(total: int) -> None:
        bar().total = total
        bar().refresh()

    with distributed.group() as grp:
        try:
            if grp.main:  # one bar: rank 0 counts every rank's images
                result = run(
                    cfg, lambda k: bar().update(k), plan, lambda w: bar().set_description(w), grp
                )
            else:
                result = run(cfg, grp=grp)
        finally:
            for b in bars:
                b.close()
    if not grp.main:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{cfg.model.replace(':', '_').replace('/', '_')}-{cfg.backend}"
    meta = report.provenance(cfg.seed)
    meta["config"] = {
        "preset": preset,
        "datasets": list(cfg.datasets),
        "n": cfg.n,
        "batch_size": cfg.batch_size,
        "timing_runs": cfg.timing_runs,
        "tasks": sorted(cfg.tasks),
    }
    if len(result["ranks"]) > 1:
        meta["ranks"] = result["ranks"]
    meta["base"] = result["base"]
    meta["hardest_dataset"] = result["hardest"][0]
    meta["datasets_hardest_first"] = result["hardest"]
    report.write_json(out / f"{stem}.json", meta, result["rows"])
    written = write_reports(meta, result["rows"], out / stem)
    print(f"wrote {out / stem}.json, " + ", ".join(written))
    return 0


def write_reports(meta: dict[str, Any], rows: list[dict[str, Any]], stem: Path) -> list[str]:
    """``stem.md`` and, with speed measured, ``stem.png`` of a run (fresh or saved: both are
    made from the JSON's ``meta`` and ``rows``, datasets ranked by :func:`.hardest_first`);
    returns the suffixes written."""
    cfg = meta["config"]
    order = hardest_first(rows, cfg["datasets"])
    stem.with_suffix(".md").write_text(markdown(rows, meta, order))
    if "speed" not in cfg["tasks"]:
        return [".md"]
    rank = {d: i for i, d in enumerate(order)}
    report.pareto_plot(
        sorted(rows, key=lambda r: rank[r["dataset"]]),  # columns hardest first
        stem.with_suffix(".png"),
        PLOTTED,
        f"{rows[0]['model']} (n={cfg['n']} per dataset, CPU, batch {cfg['batch_size']})",
        base={d: {"agreement": 1.0, "cosine_p05": 1.0} for d in meta["base"]},
        errors=ERRORS,
        by="dataset",
    )
    return [".md", ".png"]


def render(path: str | Path) -> list[str]:
    """Remake the Markdown and plot of a saved vision run (``<name>.json``) with the current
    report code; the numbers stay those of the JSON. Returns the suffixes written."""
    import json

    path = Path(path)
    saved = json.loads(path.read_text())
    return write_reports(saved["meta"], saved["rows"], path.with_suffix(""))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], order: Sequence[str]) -> str:
    """The report: the hardest dataset named at the top, then one table per dataset in
    ``order`` (hardest first), each under a line with the unreduced model's accuracies."""
    cfg = meta["config"]
    model, backend = rows[0]["model"], rows[0]["backend"]
    hardest = order[0]
    p05 = difficulty(rows)
    ranking = ", ".join(f"{d} {p05[d]:.3f}" for d in order if d in p05)
    methods = {r["method"] for r in rows}
    parts = [
        f"# tokenmerge bench: {model}\n",
        f"**Hardest dataset: {hardest}** (lowest mean cos p05 over the methods' rows, the "
        f"baselines left out: {ranking}). Its table comes first.\n",
        explain.load_warning(rows),
        explain.summary(rows, order),
        f"{model} ({backend}), n={cfg['n']} images per dataset, batch {cfg['batch_size']}. "
        "Speed-up is the median of interleaved runs against the unpatched model with its fused "
        "attention, with the interquartile range of the runs in brackets (older runs: the "
        "lowest and highest). A row whose token counts its budget fixes runs as fast on any "
        "image, so it is timed once, on the first dataset's images, and shown under each; "
        "dynamic methods and autotuned plans are timed on each dataset's own images. cos p05 "
        "± its bootstrap standard error (200 resamples). Every column is defined in the "
        "glossary at the end. "
        f"{report.FLAG} marks an agreement whose standard error is above "
        f"{SE_LIMIT} (n = 1000 keeps it below whenever the agreement is at least 0.9).\n",
    ]
    if meta.get("ranks"):
        parts.append(
            f"Run on {len(meta['ranks'])} ranks (`torchrun` or `accelerate launch`): the ranks "
            "shared the batches and gathered them in order, so every number but the timings is "
            "the one a single process gives. Each row was timed on one rank, against that "
            "rank's own unpatched model (the timing column names the rank), while the other "
            "ranks timed theirs: ranks on one machine share its cores. The ranks' machines are "
            "listed at the end.\n"
        )
    if "downsample" in methods:
        parts.append(
            "Baselines: *downsample* fits the same images to a smaller side (the budget, in "
            "pixels) and runs the unpatched model with its position table interpolated; "
            "*random* prunes random tokens at the methods' budgets. The two *vs downsampling* "
            "columns are a row's cos p05 and probe agreement minus downsampling's on the same "
            "dataset at the same measured speed-up (linear interpolation between the two "
            "nearest input sizes; empty outside the measured range): > 0 means the method "
            "beats a smaller input. The *vs ToMe* columns do the same against constant-r ToMe "
            "over its budgets. Under each dataset's table, every curve is read at the same "
            "speed-ups side by side.\n"
        )
    if methods & set(POINTS):
        parts.append(
            "*autotune* rows are plans from `tm.autotune` (input size and per-layer schedule) "
            "searched on each dataset's calibration images (disjoint from the evaluated ones) "
            "for the measured speed-up in the budget column; *plan* rows are saved plans. "
            "Their parameters (in the JSON) give the size, the schedule, what the search "
            "predicted and, for newer runs, how many images and seconds it took.\n"
        )
    matched = matched_speed(rows)
    for d in order:
        b = meta["base"][d]
        parts += [
            f"## {d}" + (" (hardest)" if d == hardest else "") + "\n",
            f"Unreduced on {d} (n={b['n']}, {b['classes']} classes): "
            f"k-NN {b['knn_acc']:.3f} ± {b['knn_acc_se']:.3f}, "
            f"probe {b['probe_acc']:.3f} ± {b['probe_acc_se']:.3f}.\n",
            report.table(
                [
                    r
                    | {
                        "timing": explain.timing_note(r),
                        "throughput_iqr": r.get("throughput_iqr") or r.get("throughput_spread"),
                    }
                    for r in rows
                    if r["dataset"] == d
                ],
                COLUMNS,
                FLAGS,
            ),
            matched_table([e for e in matched if e["dataset"] == d]),
        ]
    return "\n".join([*parts, explain.GLOSSARY, report.footer(meta)])


def matched_table(entries: list[dict[str, Any]]) -> str:
    """The dataset's curves side by side at equal measured speed (:func:`.matched_speed`):
    each cell is ``cos p05 / probe agreement``; a plan's own row adds its measured point."""
    if not entries:
        return ""
    names = list(dict.fromkeys(n for e in entries for n in e["curves"]))
    head = ["speed-up", *names, "best merging method (cos p05 / agreement)", "plan measured here"]
    lines = [
        "At equal measured speed-up (each method's curve over its budgets, linearly "
        "interpolated; empty outside its measured range). Cells: cos p05 / probe agreement.\n",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]

    def cell(v: dict[str, Any] | None) -> str:
        return "" if v is None else f"{v['cosine_p05']:.3f} / {v['agreement']:.3f}"

    for e in entries:
        pt = e["point"]
        own = f"{pt['method']} {pt['budget']}: {cell(pt)}" if pt else ""
        cells = [f"{e['speed']:.2f}", *(cell(e["curves"].get(n)) for n in names)]
        best = " / ".join(e["best"][k] for k, _ in MATCHED) if e["best"] else ""
        lines.append("| " + " | ".join([*cells, best, own]) + " |")
    return "\n".join(lines) + "\n"
