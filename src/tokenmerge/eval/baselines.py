"""The baselines a user would pick instead of a token-reduction method, and the comparison with
them at equal measured speed.

- **Downsampling**: the images are fitted to a smaller side before the model, whose position
  table the framework interpolates (transformers' ``interpolate_pos_encoding``, timm's
  ``dynamic_img_size``). Its budget is the input side in pixels; the default ladder removes
  1 to 6 patches per side (for DINOv2-S at 224 px: 210 … 140 px, 225 … 100 patch tokens).
- **Random pruning** (the ``random`` method): the scoring rule every method has to beat, run at
  the methods' budgets.

Recent benchmarks of visual token reduction (VTC-Bench, UniPruneBench) found that both beat
many published methods. So every vision report sets each method against downsampling *at the
speed the method reached*: the downsampling ladder's quality, linearly interpolated in measured
speed-up (:func:`at_speed`), is subtracted from the method's (:func:`versus`; constant-r ToMe
is the second reference). :func:`matched_speed` tabulates every curve at the same speeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: the baselines the vision bench knows
BASELINES = ("downsample", "random")

#: row keys compared at equal speed, and the report's name for each
MATCHED = (("cosine_p05", "cos p05"), ("agreement", "probe agree"))


def parse_baselines(spec: str | None) -> tuple[str, ...]:
    """``"downsample,random"`` (the default when ``None``), a subset, or ``"none"``."""
    if spec is None:
        return BASELINES
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if names == ("none",):
        return ()
    unknown = sorted(set(names) - set(BASELINES))
    if unknown or not names:
        raise ValueError(
            f"unknown baselines {unknown or [spec]}; accepted: {', '.join(BASELINES)} or none"
        )
    return names


def downsample_sizes(
    image_size: int, patch: int, steps: Sequence[int] = (1, 2, 3, 4, 5, 6)
) -> list[int]:
    """Input sides ``image_size − k·patch`` (``k`` patches fewer per side), largest first; sides
    smaller than two patches are left out."""
    grid = image_size // patch
    return [patch * (grid - k) for k in sorted(set(steps)) if grid - k >= 2]


def at_speed(points: Sequence[tuple[float, float]], speed: float) -> float | None:
    """The value at ``speed`` of the curve through ``(speed, value)`` points, linearly
    interpolated between the two nearest measured speeds on either side; ``None`` outside the
    measured range (no extrapolation). Points at the same speed are averaged."""
    merged: dict[float, list[float]] = {}
    for s, v in points:
        merged.setdefault(float(s), []).append(float(v))
    xs = sorted(merged)
    if not xs or speed < xs[0] or speed > xs[-1]:
        return None
    ys = [sum(merged[x]) / len(merged[x]) for x in xs]
    for i in range(1, len(xs)):
        if speed <= xs[i]:
            t = (speed - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + (ys[i] - ys[i - 1]) * t
    return ys[0]  # a single point, hit exactly


def versus(rows: list[dict[str, Any]], reference: str = "downsample") -> None:
    """Add ``vs_<reference>_<key>`` to every other row with a measured speed: its ``key`` minus
    the ``reference`` method's curve at the same speed (``None`` outside the curve's range).

    The reference is a baseline (``downsample``) or a method over its budgets (``tome`` at
    constant r). Rows are compared within their ``dataset`` only (rows without one form one
    group)."""
    for group in _by_dataset(rows).values():
        curve = [r for r in group if r["method"] == reference and r.get("throughput_ratio")]
        if not curve:
            continue
        for row in group:
            if row["method"] == reference:
                continue
            speed = row.get("throughput_ratio")
            for key, _ in MATCHED:
                ref = at_speed(_points(curve, key), speed) if speed else None
                row[f"vs_{reference}_{key}"] = None if ref is None else row[key] - ref


#: the speed-ups of the matched-speed table (the issue's range, 1.3× to 2.0×)
SPEEDS = (1.3, 1.5, 1.75, 2.0)
#: rows that are single points (a plan), not a curve over budgets
POINTS = ("autotune", "plan")


def matched_speed(
    rows: Sequence[dict[str, Any]], speeds: Sequence[float] = SPEEDS
) -> list[dict[str, Any]]:
    """Every method's curve at equal measured speed, per dataset.

    For each dataset and each speed (``speeds``, plus the measured speed of every plan row),
    one entry: ``{"dataset", "speed", "point": the plan row measured there or None,
    "curves": {method: {key: value}}}``, each curve (a method over its budgets, or a baseline)
    linearly interpolated at that speed, a method outside its measured range left out;
    ``"best"``: ``{key: the merging method (not a baseline) highest on key there}`` for
    ``cosine_p05`` and ``agreement`` (the two can disagree: pruning keeps the feature,
    merging the probe's decisions)."""
    out = []
    for dataset, group in _by_dataset(rows).items():
        timed = [r for r in group if r.get("throughput_ratio")]
        curves: dict[str, list[dict[str, Any]]] = {}
        for r in timed:
            if r["method"] not in POINTS:
                curves.setdefault(r["method"], []).append(r)
        marks = [(float(s), None) for s in speeds]
        marks += [(r["throughput_ratio"], r) for r in timed if r["method"] in POINTS]
        for speed, point in sorted(marks, key=lambda m: m[0]):
            at = {}
            for name, curve in curves.items():
                vals = {k: at_speed(_points(curve, k), speed) for k, _ in MATCHED}
                if None not in vals.values():
                    at[name] = vals
            merging = {n: v for n, v in at.items() if n not in BASELINES}
            best = {}
            if merging:
                best = {k: max(merging, key=lambda n, k=k: merging[n][k]) for k, _ in MATCHED}
            out.append(
                {"dataset": dataset, "speed": speed, "point": point, "curves": at, "best": best}
            )
    return out


def _points(curve: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["throughput_ratio"], r[key]) for r in curve]


def _by_dataset(rows: Sequence[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("dataset"), []).append(row)
    return groups
