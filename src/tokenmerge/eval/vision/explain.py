"""The plain-language parts of a vision report: what a run buys, in one line per dataset, a
warning when the machine was busy while timing, and a glossary of the columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..baselines import BASELINES
from ..cpuload import LOADED_CORES

#: the share of the linear probe's decisions a recommended setting must keep
KEEP = 0.95


def _speed(row: dict[str, Any]) -> str:
    iqr = row.get("throughput_iqr")
    spread = f" (IQR {iqr[0]:.2f}–{iqr[1]:.2f})" if iqr else ""
    return f"{row['throughput_ratio']:.2f}× faster{spread}"


def _versus_downsampling(row: dict[str, Any]) -> str:
    diff = row.get("vs_downsample_agreement")
    if diff is None:
        return ""
    return f"; a smaller input at the same speed keeps {row['agreement'] - diff:.0%}"


def recommend(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """The fastest timed method row (baselines left out) that keeps at least :data:`KEEP` of
    the probe's decisions and is faster beyond noise, and True; without one, the row that
    keeps the most decisions among those faster beyond noise, and False."""
    timed = [
        r
        for r in rows
        if r["method"] not in BASELINES
        and r.get("throughput_ratio")
        and r["throughput_ratio"] > 1
        and not r.get("within_noise")
        and r.get("agreement") is not None
    ]
    good = [r for r in timed if r["agreement"] >= KEEP]
    if good:
        return max(good, key=lambda r: r["throughput_ratio"]), True
    if timed:
        return max(timed, key=lambda r: (r["agreement"], r["throughput_ratio"])), False
    return None, False


def summary(rows: Sequence[dict[str, Any]], order: Sequence[str]) -> str:
    """One line per dataset (``order``: hardest first): the recommended setting and what it
    buys, e.g. "tome r=16: 1.42× faster (IQR 1.38–1.47), 97% of the probe's decisions
    unchanged, CLS cosine 0.995"."""
    lines = [
        f"**What it buys.** Per dataset, the fastest setting that keeps at least {KEEP:.0%} of "
        "a linear probe's decisions (speed-up against the unpatched model, median of "
        "interleaved runs):\n"
    ]
    for d in order:
        row, keeps = recommend([r for r in rows if r["dataset"] == d])
        if row is None:
            lines.append(f"- {d}: no setting was measured faster than the unpatched model.")
            continue
        what = (
            f"{row['method']} {row['budget']}: {_speed(row)}, {row['agreement']:.0%} of the "
            "probe's decisions unchanged"
            + (f", CLS cosine {row['cosine']:.3f}" if row.get("cosine") is not None else "")
            + _versus_downsampling(row)
        )
        lead = "" if keeps else f"nothing keeps {KEEP:.0%}; the most faithful is "
        lines.append(f"- {d}: {lead}{what}.")
    return "\n".join(lines) + "\n"


def load_warning(rows: Sequence[dict[str, Any]]) -> str:
    """A warning when other processes kept the machine busy during any timing, else ''."""
    loads = sorted(r["other_load"] for r in rows if r.get("other_load") is not None)
    if not loads or loads[-1] <= LOADED_CORES:
        return ""
    return (
        f"**The machine was loaded while timing**: other processes took up to "
        f"{loads[-1]:.2f} cores (median {loads[len(loads) // 2]:.2f}) during the timed runs. "
        "Speed-ups are less reliable than on a quiet machine; rerun when it is idle.\n"
    )


GLOSSARY = f"""## Glossary

- **speed-up (IQR)**: images per second with the reduction over images per second of the
  unpatched model (its fused attention), the median of interleaved pairs on the same batch,
  with the interquartile range of the pairs. > 1 is faster.
- **timing**: *within noise* when the interquartile range holds 1.0 (not shown faster or
  slower); *loaded* when other processes took more than {LOADED_CORES} cores meanwhile.
- **FLOPs**: the analytic FLOPs of the reduced forward over the unpatched one (lower is less
  work).
- **cos**: mean cosine similarity of the CLS feature to the unreduced model's, per image
  (1 = identical). **cos p05**: its 5th percentile, the worst 5% of images, ± a bootstrap
  standard error.
- **k-NN drop / probe drop**: accuracy lost against the unreduced model on the same images,
  for a leave-one-out k-NN (k = 20, cosine) and a cross-fitted linear probe trained on the
  unreduced features. A negative drop means the reduced model scored higher: within its
  standard error, that is noise.
- **k-NN agree / probe agree**: the share of images whose predicted class is the unreduced
  model's (1 = every decision unchanged), ± its standard error. It has far more statistical
  power than the accuracy drops.
- **saliency r / top-10% IoU**: the saliency head fed the tokens put back on the patch grid:
  Pearson correlation of its heatmap with the unreduced one, and the overlap of their top 10%
  pixels.
- **vs downsampling / vs ToMe**: the row's cos p05 or probe agreement minus that of a smaller
  input (or constant-r ToMe) at the same measured speed-up; > 0 means better than it.
- **tokens after each layer**: mean tokens left after each block.
"""


def timing_note(row: dict[str, Any]) -> str:
    """The *timing* column: "within noise", "loaded (0.80 cores)", the rank that timed the row
    in a distributed run ("rank 1"), any of them, or ''."""
    notes = [] if row.get("timing_rank") is None else [f"rank {row['timing_rank']}"]
    if row.get("within_noise"):
        notes.append("within noise")
    load = row.get("other_load")
    if load is not None and load > LOADED_CORES:
        notes.append(f"loaded ({load:.2f} cores)")
    return ", ".join(notes)
