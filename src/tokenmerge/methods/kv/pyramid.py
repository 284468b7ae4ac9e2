"""PyramidKV's per-layer budgets: a budget option for any KV scorer (``layer_budget="pyramid"``)."""

from __future__ import annotations

import functools


@functools.cache
def pyramid_ratios(ratio: float, depth: int, beta: float = 20.0) -> tuple[float, ...]:
    """Per-layer removal fractions in the PyramidKV shape (Cai et al. 2024, arXiv:2406.02069).

    "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling".
    With ``m = depth`` layers and a mean kept fraction ``k = 1 - ratio``, the kept fractions
    form an arithmetic sequence from the bottom layer to the top one::

        k_{m-1} = k / beta,     k_0 = 2 k - k_{m-1},
        k_l     = k_0 - (k_0 - k_{m-1}) l / (m - 1)

    so their mean is ``k``: the same total cache as a uniform ratio, more of it in the lower
    layers, where attention is spread widely, and less in the upper ones, where it
    concentrates. When ``k_0`` would exceed 1 (mild compression), the bottom layer keeps
    everything and the top one ``2k - 1``: the steepest pyramid with the same mean.

    Returns:
        ``depth`` fractions removed, one per layer (``1 - k_l``).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    k = 1.0 - ratio
    if depth == 1 or ratio == 0.0:
        return (ratio,) * depth
    top = k / beta
    bottom = 2.0 * k - top
    if bottom > 1.0:
        bottom, top = 1.0, 2.0 * k - 1.0
    step = (bottom - top) / (depth - 1)
    return tuple(1.0 - (bottom - step * layer) for layer in range(depth))
