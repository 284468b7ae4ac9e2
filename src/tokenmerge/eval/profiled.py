"""Where the time goes: a vision model's CPU time per operator group, unpatched and patched.

``torch.profiler`` records each operator's *self* time (its children excluded, so nothing is
counted twice) over a few calls on one batch; the operators are summed into groups (matrix
products, attention, normalisation, activations, data movement, the rest). The report sets the
measured speed-up of each budget beside the one its FLOPs predict (``1 / FLOPs ratio``) and
shows which group keeps the realised speed-up from that prediction. A diagnostic beside the
benchmark (the profiler adds its own overhead), not a test.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..api import adapter_for, apply, remove, state
from ..core.budget import budget_label, parse_budget
from ..methods import get_method
from . import report

#: operator groups, matched by substring of the ATen name, first match wins
GROUPS: dict[str, tuple[str, ...]] = {
    "matrix products": ("addmm", "::mm", "bmm", "matmul", "linear", "convolution"),
    "attention": ("scaled_dot_product", "softmax", "baddbmm"),
    "normalisation": ("layer_norm", "rms_norm"),
    "activation": ("gelu", "silu", "relu"),
    "data movement": ("copy", "clone", "cat", "index", "gather", "scatter", "contiguous", "fill_"),
}
OTHER = "other"


def group_of(op: str) -> str:
    """The :data:`GROUPS` name of ATen operator ``op`` (:data:`OTHER` if none matches)."""
    return next((g for g, keys in GROUPS.items() if any(k in op for k in keys)), OTHER)


@torch.inference_mode()
def op_times(call: Callable[[], Any], calls: int = 3, warmup: int = 2) -> dict[str, float]:
    """Milliseconds of CPU self time per call of ``call()``, by operator group."""
    for _ in range(warmup):
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    out = dict.fromkeys([*GROUPS, OTHER], 0.0)
    for ev in prof.key_averages():
        out[group_of(ev.key)] += ev.self_cpu_time_total / 1e3 / calls
    return out


def run(model: nn.Module, call: Callable[[nn.Module, torch.Tensor], Any], x: torch.Tensor,
        method: str, budgets: list, calls: int = 3) -> list[dict[str, Any]]:  # fmt: skip
    """One row for the unpatched model and one per budget: time per group, total, the
    measured speed-up (totals) and the FLOPs ratio of the tokens kept."""
    cost = adapter_for(model).target(model).cost
    rows = [{"budget": "unpatched", "ms": op_times(lambda: call(model, x), calls)}]
    n0 = None
    for b in budgets:
        apply(model, get_method(method, r=b))
        try:
            row = {"budget": budget_label(b), "ms": op_times(lambda: call(model, x), calls)}
            tokens = [float(c.float().mean()) for c in state(model).tokens_per_layer]
            n0 = n0 or int(state(model).n_orig)
            row["flops_ratio"] = cost.flops(n0, tokens) / cost.flops(n0, [n0] * cost.depth)
        finally:
            remove(model)
        rows.append(row)
    base = sum(rows[0]["ms"].values())
    for row in rows:
        row["total_ms"] = sum(row["ms"].values())
        row["speedup"] = base / row["total_ms"]
        if "flops_ratio" in row:
            row["realised_over_predicted"] = row["speedup"] * row["flops_ratio"]
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    groups = [*GROUPS, OTHER]
    lines = [
        f"# Where the time goes: {meta['model']} ({meta['method']}, batch {meta['batch_size']})",
        "",
        f"CPU self time per operator group, ms per batch (mean of {meta['calls']} profiled "
        "calls after 2 warm-up calls; the profiler's overhead included). *predicted* is "
        "1 / FLOPs ratio of the tokens kept; *realised / predicted* above 1 means the patched "
        f"model gains more than its FLOPs. Load average at the start: {meta['load_avg']}.",
        "",
        "| budget | " + " | ".join(groups) + " | total | speed-up | predicted | realised / "
        "predicted |",
        "|---" * (len(groups) + 5) + "|",
    ]
    for r in rows:
        cells = [f"{r['ms'][g]:.0f}" for g in groups]
        pred = f"{1 / r['flops_ratio']:.2f}×" if "flops_ratio" in r else ""
        rop = f"{r['realised_over_predicted']:.2f}" if "flops_ratio" in r else ""
        lines.append(
            f"| {r['budget']} | " + " | ".join(cells) + f" | {r['total_ms']:.0f} | "
            f"{r['speedup']:.2f}× | {pred} | {rop} |"
        )
    return "\n".join(lines) + "\n"


def cli_main(args: argparse.Namespace) -> int:
    from . import zoo
    from .vision import load_dataset

    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    get_method(args.method, r=budgets[0])  # fail on a bad method before loading anything
    images, _ = load_dataset(args.dataset, args.batch_size, args.seed)  # refuses a bad name
    vm = zoo.load_vision(args.model, backend=args.backend)
    x = vm.preprocess(images)
    meta = report.provenance(args.seed) | {
        "model": f"{args.model} ({vm.backend})",
        "dataset": args.dataset,
        "method": args.method,
        "batch_size": args.batch_size,
        "calls": args.calls,
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    rows = run(vm.model, lambda m, v: vm.tokens(v), x, args.method, budgets, args.calls)
    md = markdown(meta, rows)
    report.save(args.out, args.name or f"profile-{args.model}-{vm.backend}", meta, rows, md)
    print(md)
    return 0
