"""The baselines a user would pick instead of a token-reduction method, and the comparison with
them at equal measured speed.

- **Downsampling**: the images are fitted to a smaller side before the model, whose position
  table the framework interpolates (transformers' ``interpolate_pos_encoding``, timm's
  ``dynamic_img_size``). Its budget is the input side in pixels; the default ladder removes
  2 to 6 patches per side (for DINOv2-S at 224 px: 196 … 140 px, 196 … 100 patch tokens).
- **Random pruning** (the ``random`` method): the scoring rule every method has to beat, run at
  the methods' budgets.

Recent benchmarks of visual token reduction (VTC-Bench, UniPruneBench) found that both beat
many published methods. So every vision report sets each method against downsampling *at the
speed the method reached*: the downsampling ladder's quality, linearly interpolated in measured
speed-up (:func:`at_speed`), is subtracted from the method's.
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


def downsample_sizes(image_size: int, patch: int, steps: Sequence[int] = (2, 3, 4, 5, 6)) -> list:
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


def versus_downsampling(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_downsample_<key>`` to every non-baseline row with a measured speed: its
    ``key`` minus downsampling's at the same speed (``None`` outside the ladder's range).

    Rows are compared within their ``dataset`` only (rows without one form one group)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("dataset"), []).append(row)
    for group in groups.values():
        _versus_ladder(group)


def _versus_ladder(rows: list[dict[str, Any]]) -> None:
    ladder = [r for r in rows if r["method"] == "downsample" and r.get("throughput_ratio")]
    for row in rows:
        if row["method"] == "downsample":
            continue
        speed = row.get("throughput_ratio")
        for key, _ in MATCHED:
            ref = None
            if speed and ladder:
                ref = at_speed([(r["throughput_ratio"], r[key]) for r in ladder], speed)
            row[f"vs_downsample_{key}"] = None if ref is None else row[key] - ref
