"""What ``torch.compile`` adds on top of token reduction: a benchmark, not a test.

For each budget the model is deep-copied, patched and compiled (Inductor, the default
backend), so no variant's guards invalidate another's graphs. Every round times every
variant once, in a rotating order, on the same batch; each variant's speed-up is the median
(with its interquartile range) of its per-round ratio to the unpatched eager model. The
report also gives the graph breaks (``torch._dynamo.explain``), the compile time and the
largest difference between compiled and eager outputs.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..api import apply
from ..core.budget import Budget, budget_label, parse_budget
from ..methods import get_method
from . import report


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def run(
    model: nn.Module,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    method: str,
    budgets: list[Budget],
    rounds: int = 10,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Rows for the unpatched model and each budget, eager and compiled."""
    variants: dict[str, tuple[nn.Module, str]] = {"unpatched": (model, "-")}
    for b in budgets:
        m = copy.deepcopy(model)
        apply(m, get_method(method, r=b))
        variants[budget_label(b)] = (m, budget_label(b))
    rows, fns = [], {}
    for label, (m, _) in variants.items():
        eager = call(m, x)
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(lambda v, m=m: call(m, v))(x).graph_break_count
        torch._dynamo.reset()
        compiled = torch.compile(m)
        t_compile = _timed(lambda c=compiled: call(c, x))
        got = call(compiled, x)
        diff = float((got - eager).abs().max())
        cos = float(torch.nn.functional.cosine_similarity(got.flatten(1), eager.flatten(1)).min())
        fns[(label, "eager")] = lambda m=m: call(m, x)
        fns[(label, "compiled")] = lambda c=compiled: call(c, x)
        rows.append({"budget": label, "graph_breaks": breaks, "compile_s": t_compile,
                     "max_abs_diff": diff, "min_cosine": cos})  # fmt: skip
    keys = list(fns)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for i in range(warmup + rounds):
        order = keys[i % len(keys) :] + keys[: i % len(keys)]  # rotate who goes first
        got = {k: _timed(fns[k]) for k in order}
        if i >= warmup:
            for k in keys:
                times[k].append(got[k])
    base = times[("unpatched", "eager")]
    for row in rows:
        for mode in ("eager", "compiled"):
            ts = times[(row["budget"], mode)]
            lo, med, hi = _quantiles([b / t for b, t in zip(base, ts, strict=True)])
            row[f"{mode}_s"] = statistics.median(ts)
            row[f"{mode}_speedup"] = med
            row[f"{mode}_speedup_iqr"] = [lo, hi]
        c = times[(row["budget"], "compiled")]
        e = times[(row["budget"], "eager")]
        row["compiled_over_eager"] = _quantiles([a / b for a, b in zip(e, c, strict=True)])[1]
    return rows


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# torch.compile on {meta['model']} ({meta['method']}, batch {meta['batch_size']})",
        "",
        f"Speed-ups against the unpatched eager model: median of {meta['rounds']} interleaved "
        "rounds, interquartile range in brackets. `compiled/eager`: the same patched model, "
        f"compiled versus eager. Load average at the start: {meta['load_avg']}. The last two "
        "columns compare the compiled output with the eager one (per-sample cosine, its "
        "minimum): compiled kernels round differently, so a near-tie in a merge decision can "
        "flip, and that sample then takes another (equally valid) merge path.",
        "",
        "| budget | graph breaks | eager speed-up | compiled speed-up | compiled/eager "
        "| compile s | max abs diff | min cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, c = r["eager_speedup_iqr"], r["compiled_speedup_iqr"]
        lines.append(
            f"| {r['budget']} | {r['graph_breaks']} | {r['eager_speedup']:.2f}× "
            f"[{e[0]:.2f}, {e[1]:.2f}] | {r['compiled_speedup']:.2f}× [{c[0]:.2f}, {c[1]:.2f}] "
            f"| {r['compiled_over_eager']:.2f}× | {r['compile_s']:.0f} | {r['max_abs_diff']:.1e} "
            f"| {r['min_cosine']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def cli_main(args: argparse.Namespace) -> int:
    from . import zoo

    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    get_method(args.method, r=budgets[0])  # fail on a bad method before loading anything
    vm = zoo.load_vision(args.model, backend=args.backend)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, vm.image_size, vm.image_size, generator=g)
    meta = report.provenance(args.seed) | {
        "model": f"{args.model} ({vm.backend})",
        "method": args.method,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    if vm.backend == "timm":  # compile wraps forward: time the model's own forward
        call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, v: m(v)  # noqa: E731
    else:
        call = lambda m, v: m(pixel_values=v).pooler_output  # noqa: E731
    rows = run(vm.model, call, x, args.method, budgets, args.rounds)
    md = _markdown(meta, rows)
    report.save(args.out, args.name or f"compile-{args.model}-{vm.backend}", meta, rows, md)
    print(md)
    return 0
