"""Benchmark reports: JSON with provenance, a Markdown table and a Pareto plot."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("tokenmerge", "torch", "timm", "transformers", "sentence-transformers", "numpy")


def provenance(seed: int, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Versions, seed and machine, recorded in every result file."""
    versions = {}
    for p in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[p] = metadata.version(p)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "seed": seed,
        "versions": versions,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        },
    }


def method_params(method: object, budget: str) -> dict[str, Any]:
    """A method's hyper-parameters for a report, JSON-ready (tensors become lists)."""
    out: dict[str, Any] = {}
    for k, v in vars(method).items():
        if k == "r" or k.startswith("_"):
            continue
        out[k] = [round(float(x), 5) for x in v.flatten()] if isinstance(v, torch.Tensor) else v
    return out | {"r": budget}


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return " ".join(f"{x:.0f}" if isinstance(x, float) else str(x) for x in v)
    return "" if v is None else str(v)


def _cell(row: dict[str, Any], key: str | tuple[str, str]) -> str:
    if isinstance(key, tuple):  # (value, standard error)
        v, se = row.get(key[0]), row.get(key[1])
        if v is None:
            return ""
        return f"{v:.3f}" if se is None else f"{v:.3f} ± {se:.3f}"
    return _fmt(row.get(key))


def markdown(
    rows: list[dict[str, Any]],
    columns: list[tuple[str | tuple[str, str], str]],
    meta: dict[str, Any],
    title: str,
    notes: str = "",
) -> str:
    """A Markdown table of ``rows`` with ``(key, header)`` columns and a provenance footer.

    A key may be a ``(value_key, se_key)`` pair, shown as ``value ± se``.
    """
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r, k) for k, _ in columns) + " |" for r in rows]
    v = meta["versions"]
    foot = (
        f"\nGenerated {meta['date']} by `{meta['command']}` (seed {meta['seed']}) on "
        f"{meta['machine']['cpus']} CPUs ({meta['machine']['torch_threads']} torch threads), "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + ".\n"
    )
    return "\n".join([f"# {title}\n", notes, head, sep, *body, foot])


def pareto_plot(
    rows: list[dict[str, Any]],
    path: Path,
    metrics: list[tuple[str, str]],
    title: str,
    base: dict[str, float] | None = None,
) -> None:
    """One panel per ``(key, label)`` metric against measured throughput ratio, a line a method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for m in methods:
            # points in budget order (the row order), labelled, so noise in the measured
            # speed-up shows as a kink instead of reordering the line
            pts = [
                (r["throughput_ratio"], r[key], r.get("budget", ""))
                for r in rows
                if r["method"] == m and r.get(key) is not None
            ]
            if pts:
                xs, ys, _ = zip(*pts, strict=True)
                i = methods.index(m)  # distinct colour and marker for up to 20 methods
                (line,) = ax.plot(
                    xs, ys, marker="os^vD"[i % 5], color=plt.get_cmap("tab20")(i % 20), label=m
                )
                if len(methods) <= 3:
                    for x, y, lab in pts:
                        ax.annotate(
                            lab,
                            (x, y),
                            fontsize=7,
                            color=line.get_color(),
                            xytext=(3, 3),
                            textcoords="offset points",
                        )
        if base and base.get(key) is not None:
            ax.scatter(
                [1.0], [base[key]], color="black", marker="*", s=120, zorder=5, label="unreduced"
            )
        ax.set_xlabel("measured throughput ratio (vs unpatched)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
