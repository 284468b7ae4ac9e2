"""Benchmark reports: JSON with provenance, a Markdown table and a Pareto plot."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
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


def save(
    folder: str | Path, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]], md: str
) -> Path:
    """``folder/stem.json`` (meta and rows) and ``folder/stem.md``; returns the JSON's path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", meta, rows)
    (out / f"{stem}.md").write_text(md)
    return out / f"{stem}.json"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return " ".join(f"{x:.0f}" if isinstance(x, float) else str(x) for x in v)
    return "" if v is None else str(v)


#: marks a value whose standard error is above the limit given to :func:`table`
FLAG = "†"


def _cell(
    row: dict[str, Any], key: str | tuple[str, str], flags: Mapping[str, float] | None = None
) -> str:
    if isinstance(key, tuple):  # (value, standard error) or (value, [lowest, highest])
        v, se = row.get(key[0]), row.get(key[1])
        if v is None:
            return ""
        if isinstance(se, (list, tuple)):
            return f"{v:.2f} ({se[0]:.2f}–{se[1]:.2f})"
        if se is None:
            return f"{v:.3f}"
        limit = (flags or {}).get(key[1])
        mark = f" {FLAG}" if limit is not None and se > limit else ""
        return f"{v:.3f} ± {se:.3f}{mark}"
    return _fmt(row.get(key))


def table(
    rows: list[dict[str, Any]],
    columns: list[tuple[str | tuple[str, str], str]],
    flags: Mapping[str, float] | None = None,
) -> str:
    """A Markdown table of ``rows`` with ``(key, header)`` columns.

    A key may be a ``(value_key, se_key)`` pair, shown as ``value ± se``, or as
    ``value (lo–hi)`` when the second key holds a ``[lo, hi]`` spread. ``flags`` maps an
    ``se_key`` to a limit: a larger standard error is marked with :data:`FLAG` and explained
    in a footnote under the table.
    """
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r, k, flags) for k, _ in columns) + " |" for r in rows]
    out = "\n".join([head, sep, *body])
    limits = sorted(
        {
            flags[k[1]]
            for r in rows
            for k, _ in columns
            if isinstance(k, tuple) and k[1] in (flags or {}) and (r.get(k[1]) or 0) > flags[k[1]]
        }
    )
    if limits:
        out += f"\n\n{FLAG} standard error above {' / '.join(f'{x:g}' for x in limits)}."
    return out + "\n"


def footer(meta: dict[str, Any]) -> str:
    """The provenance line under a report: date, command, seed, machine and versions."""
    v = meta["versions"]
    ranks = meta.get("ranks")
    where = (
        f"{len(ranks)} ranks ("
        + "; ".join(
            f"rank {m['rank']}: {m['host']}, {m['cores']} cores, {m['torch_threads']} torch threads"
            for m in ranks
        )
        + ")"
        if ranks
        else f"{meta['machine']['cpus']} CPUs ({meta['machine']['torch_threads']} torch threads)"
    )
    return (
        f"Generated {meta['date']} by `{meta['command']}` (seed {meta['seed']}) on {where}, "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + ".\n"
    )


def markdown(
    rows: list[dict[str, Any]],
    columns: list[tuple[str | tuple[str, str], str]],
    meta: dict[str, Any],
    title: str,
    notes: str = "",
    flags: Mapping[str, float] | None = None,
) -> str:
    """One :func:`table` under a title and notes, with the provenance :func:`footer`."""
    return "\n".join([f"# {title}\n", notes, table(rows, columns, flags), footer(meta)])


def pareto_plot(
    rows: list[dict[str, Any]],
    path: Path,
    metrics: list[tuple[str, str]],
    title: str,
    base: dict[str, Any] | None = None,
    errors: Mapping[str, str] | None = None,
    by: str | None = None,
) -> None:
    """Quality against measured throughput ratio, a line per method, budgets written next to
    the points.

    Without ``by``: one row of panels, one per ``(key, label)`` metric, and ``base`` maps a
    metric to the unreduced model's value (a dashed reference line). With ``by`` (a row key
    such as ``"dataset"``): a column of panels per value of it, in the order the rows first
    show it, a row of panels per metric, and ``base`` maps each value to such a dict.
    ``errors`` maps a metric to the row key of its standard error (error bars).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.get(by) for r in rows)) if by else [None]
    if by:
        shape, size = (len(metrics), len(groups)), (4.6 * len(groups) + 2, 3.4 * len(metrics))
    else:  # the + 2 inches: the legend, beside the panels
        shape, size = (1, len(metrics)), (5 * len(metrics) + 2, 4)
    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False)
    methods = sorted({r["method"] for r in rows})
    for j, group in enumerate(groups):
        mine = [r for r in rows if by is None or r.get(by) == group]
        ref = ((base or {}).get(group) or {}) if by else (base or {})
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j] if by else axes[0][i]
            _panel(ax, mine, methods, key, (errors or {}).get(key), ref.get(key))
            ax.set_ylabel(label)
            if by is None or i == len(metrics) - 1:
                ax.set_xlabel("measured speed-up vs unpatched (right is faster)")
            if by and i == 0:
                ax.set_title(str(group))
    # beside the panels, where it hides no point
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(
    ax: Any,
    rows: list[dict[str, Any]],
    methods: list[str],
    key: str,
    se_key: str | None,
    ref: float | None,
) -> None:
    """One metric's lines (one per method, with error bars) and the unreduced reference."""
    import matplotlib.pyplot as plt

    for i, m in enumerate(methods):
        # points in budget order (the row order), so noise in the measured speed-up shows as
        # a kink instead of reordering the line
        pts = [
            (
                r["throughput_ratio"],
                r[key],
                (r.get(se_key) if se_key else None) or 0.0,
                r.get("budget", ""),
                r.get("throughput_iqr") or (r["throughput_ratio"],) * 2,
            )
            for r in rows
            if r["method"] == m and r.get(key) is not None and r.get("throughput_ratio")
        ]
        if not pts:
            continue
        xs, ys, errs, labels, iqrs = zip(*pts, strict=True)
        # horizontal bars: the interquartile range of the timed pairs, where measured
        xerr = [
            [x - q[0] for x, q in zip(xs, iqrs, strict=True)],
            [q[1] - x for x, q in zip(xs, iqrs, strict=True)],
        ]
        # the same method, the same colour in every panel; tab10's colours are the most distinct
        colour = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(i % 20)
        ax.errorbar(
            xs,
            ys,
            yerr=errs if se_key else None,
            xerr=xerr,
            marker="os^vD"[i % 5],
            color=colour,
            capsize=2,
            label=m,
        )
        for x, y, lab in zip(xs, ys, labels, strict=True):
            ax.annotate(
                lab, (x, y), fontsize=6, color=colour, xytext=(3, 3), textcoords="offset points"
            )
    if ref is not None:
        ax.axhline(ref, color="black", ls="--", lw=1, label="unreduced")
    ax.grid(alpha=0.3)
