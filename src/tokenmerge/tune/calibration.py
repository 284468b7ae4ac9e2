"""Running a model over unlabelled calibration data: the one driving loop shared by calibrated
methods (DToMe's thresholds, :func:`calibrate`) and the autotuner (:mod:`.autotune`).

It sits above the adapters: methods never patch models themselves. A method that learns from
data implements the :class:`Calibrated` protocol (``begin_calibration`` / ``end_calibration``),
and :func:`calibrate` patches the model, feeds it the batches and hands the method the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..api import apply, patch_of, remove
from ..core.budget import Budget, TargetTokens, as_budget, as_int
from ..methods.base import REGISTRY, Method

#: ``forward(model, batch)`` runs one batch (default :func:`default_forward`)
Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict (tokenizer output), else ``model(batch)``."""
    return model(**batch) if isinstance(batch, dict) else model(batch)


def as_batches(data: Iterable[Any] | Tensor, batch_size: int) -> Iterable[Any]:
    """``data`` as batches: a tensor is cut into ``batch_size`` chunks, an iterable of batches
    is passed through."""
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    return data.split(batch_size) if isinstance(data, Tensor) else data


@runtime_checkable
class Calibrated(Protocol):
    """A method that learns its parameters from unlabelled data while the model runs."""

    def begin_calibration(self, budget: Budget) -> None:
        """Start recording: the following forwards run at ``budget`` and are measured."""

    def end_calibration(self, depth: int, batches: int) -> None:
        """Stop recording and derive the parameters (``batches`` is 0 when aborted)."""


@torch.no_grad()
def calibrate(
    model: nn.Module,
    method: Method,
    data: Iterable[Any] | Tensor,
    *,
    target_tokens: int | None = None,
    r: Any = None,
    batch_size: int = 32,
    forward: Forward | None = None,
) -> Method:
    """Fit ``method``'s data-dependent parameters on unlabelled ``data``; returns ``method``.

    Args:
        model: the model, unpatched (patched here for the duration) or patched with this
            very method.
        method: a :class:`Calibrated` method (``tm.get_method("dtome")``).
        data: an iterable of input batches, or one tensor of inputs cut into ``batch_size``
            chunks. Each batch runs as ``model(batch)`` (``model(**batch)`` for a dict)
            unless ``forward(model, batch)`` is given.
        target_tokens: mean tokens per sample to reach after the last layer (a
            :class:`~tokenmerge.core.budget.TargetTokens` budget).
        r: any other budget (int, ``(r, inflection)``, list, ``KeepRatio``, ...): the
            average number of merges per layer. Default: the method's own ``r``.

    Calibration replaces earlier parameters (DToMe: a running mean over this call's batches).
    """
    if not isinstance(method, Calibrated):
        names = [n for n, c in REGISTRY.items() if issubclass(c, Calibrated)]
        raise TypeError(
            f"{type(method).__name__} has nothing to calibrate; calibrated methods: "
            + ", ".join(sorted(names))
        )
    if target_tokens is not None and r is not None:
        raise ValueError("give either target_tokens or r, not both")
    budget = TargetTokens(target_tokens) if target_tokens is not None else None
    budget = budget or as_budget(method.r if r is None else r)
    batches = as_batches(data, batch_size)
    run = forward or default_forward
    owner = getattr(model, "_tokenmerge_patch", None)
    if owner is not None and owner.method is not method:
        raise ValueError(
            f"the model is patched with {owner.method!r}; remove it first or calibrate "
            "with the method instance it is patched with"
        )
    if owner is None:
        apply(model, method)
    depth = len(patch_of(model).target.blocks)
    method.begin_calibration(budget)
    n = 0
    try:
        for batch in batches:
            run(model, batch)
            n += 1
    finally:
        method.end_calibration(depth, n)
        if owner is None:
            remove(model)
    if n == 0:
        raise ValueError("calibrate needs at least one batch")
    return method
