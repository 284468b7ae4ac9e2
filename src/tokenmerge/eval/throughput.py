"""Throughput measured against the *unpatched* model in the same process.

Speed is never a timed test: it is measured here and written into the benchmark reports. The
baseline is always the model as it ships (fused SDPA attention), never the patched model at
budget 0. Runs are interleaved (baseline, patched, baseline, ...) so that noise from a shared
machine hits both alike, and the ratio reported is the median of per-pair ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..api import apply, remove
from ..methods.base import Method


@dataclass(frozen=True)
class Timing:
    """One batch size: medians over the interleaved runs."""

    batch_size: int
    base_s: float  # median seconds per batch, unpatched
    reduced_s: float  # median seconds per batch, patched
    ratio: float  # median of per-pair (base / reduced): > 1 means faster

    @property
    def base_items_per_s(self) -> float:
        return self.batch_size / self.base_s

    @property
    def reduced_items_per_s(self) -> float:
        return self.batch_size / self.reduced_s


def _time(run: Callable[[nn.Module, torch.Tensor], object], model: nn.Module, x) -> float:
    t0 = time.perf_counter()
    run(model, x)
    return time.perf_counter() - t0


@torch.inference_mode()
def compare(
    model: nn.Module,
    method: Method,
    run: Callable[[nn.Module, torch.Tensor], object],
    make_batch: Callable[[int], torch.Tensor],
    batch_sizes: Sequence[int] = (32,),
    runs: int = 7,
    warmup: int = 2,
) -> list[Timing]:
    """Interleaved timing of ``model`` unpatched and patched with ``method``.

    Args:
        run: calls the model on a batch (e.g. ``lambda m, x: m(pixel_values=x)``).
        make_batch: returns an input batch of the given size.
        runs: timed pairs per batch size (after ``warmup`` untimed pairs).
    """
    out = []
    for bs in batch_sizes:
        x = make_batch(bs)
        base, red, ratios = [], [], []
        for i in range(warmup + runs):
            tb = _time(run, model, x)
            apply(model, method)
            try:
                tr = _time(run, model, x)
            finally:
                remove(model)
            if i >= warmup:
                base.append(tb)
                red.append(tr)
                ratios.append(tb / tr)
        out.append(
            Timing(bs, statistics.median(base), statistics.median(red), statistics.median(ratios))
        )
    return out
