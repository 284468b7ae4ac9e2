"""Throughput measured against the *unpatched* model in the same process.

Speed is never a timed test: it is measured here and written into the benchmark reports. The
baseline is always the model as it ships (fused SDPA attention), never the patched model at
budget 0. Runs are interleaved (baseline, patched, baseline, ...) so that noise from a shared
machine hits both alike, and the ratio reported is the median of per-pair ratios, with their
interquartile range (a ratio whose middle half holds 1.0 is *within noise*) and the cores other
processes took meanwhile (:mod:`.cpuload`).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..api import apply, remove
from ..methods.base import Method
from .cpuload import OtherLoad


@dataclass(frozen=True)
class Timing:
    """One batch size: medians over the interleaved runs."""

    batch_size: int
    base_s: float  # median seconds per batch, unpatched
    reduced_s: float  # median seconds per batch, patched
    ratio: float  # median of per-pair (base / reduced): > 1 means faster
    ratios: tuple[float, ...] = ()  # every timed pair's ratio, in run order
    #: cores other processes kept busy while these pairs ran (:mod:`.cpuload`; None: unknown)
    other_load: float | None = None

    @property
    def spread(self) -> tuple[float, float] | None:
        """The lowest and highest per-pair ratio (``None`` without the pairs)."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else None

    @property
    def iqr(self) -> tuple[float, float] | None:
        """The interquartile range of the per-pair ratios (``None`` under two pairs)."""
        if len(self.ratios) < 2:
            return None
        q1, _, q3 = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return (q1, q3)

    @property
    def within_noise(self) -> bool:
        """True when the middle half of the pairs holds 1.0: not shown faster (or slower)."""
        iqr = self.iqr
        return iqr is not None and iqr[0] <= 1.0 <= iqr[1]

    @property
    def base_items_per_s(self) -> float:
        return self.batch_size / self.base_s

    @property
    def reduced_items_per_s(self) -> float:
        return self.batch_size / self.reduced_s


def _seconds(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


@torch.inference_mode()
def interleave(
    base: Callable[[], object],
    other: Callable[[], object],
    batch_size: int,
    runs: int = 7,
    warmup: int = 2,
    between: Callable[[bool], None] | None = None,
) -> Timing:
    """Time ``base()`` and ``other()`` alternately (``warmup`` untimed pairs first).

    ``between(True)`` runs before each ``other()`` and ``between(False)`` after it (untimed:
    patching and unpatching the model)."""
    switch = between or (lambda on: None)

    def pair() -> tuple[float, float]:
        tb = _seconds(base)
        switch(True)
        try:
            return tb, _seconds(other)
        finally:
            switch(False)

    for _ in range(warmup):
        pair()
    with OtherLoad() as load:  # the timed pairs only: warm-up noise is not the timing's
        timed = [pair() for _ in range(runs)]
    bases = [tb for tb, _ in timed]
    others = [to for _, to in timed]
    ratios = [tb / to for tb, to in timed]
    return Timing(
        batch_size,
        statistics.median(bases),
        statistics.median(others),
        statistics.median(ratios),
        tuple(ratios),
        load.cores,
    )


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
        step = functools.partial(run, model, make_batch(bs))
        out.append(interleave(step, step, bs, runs, warmup, between=toggle(model, method)))
    return out


def toggle(
    model: nn.Module, method: Method, input_scale: float | None = None
) -> Callable[[bool], None]:
    """``between`` for :func:`interleave`: patch ``model`` with ``method`` (and the input
    resize of ``input_scale``) on True, remove it on False."""

    def switch(on: bool) -> None:
        if on:
            apply(model, method, input_scale=input_scale)
        else:
            remove(model)

    return switch
