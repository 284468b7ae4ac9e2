"""The public entry points: :func:`apply`, :func:`remove`, :func:`patched`, :func:`state`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapters import ADAPTERS, Patch, UnsupportedModelError
from .adapters.base import ATTR, Adapter
from .core.state import TokenState
from .methods.base import Method


def supported_families() -> list[str]:
    """One line per model family that an adapter supports."""
    return [f"{a.family}: {a.description}" for a in ADAPTERS]


def denoiser(model: Any) -> nn.Module:
    """``model`` itself, or the denoiser of a diffusers pipeline (its ``unet`` or
    ``transformer``), so that ``tm.apply(pipe, tm.ToMeSD(...))`` works as tomesd's does."""
    if isinstance(model, nn.Module):
        return model
    for attr in ("unet", "transformer"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    raise TypeError(
        f"expected a torch.nn.Module, or a diffusers pipeline with a .unet or .transformer, "
        f"got {type(model).__name__}"
    )


def apply(model: Any, method: Method, *, input_scale: float | None = None) -> Any:
    """Patch ``model`` in place so that ``method`` reduces its tokens; returns ``model``.

    A diffusers pipeline is patched through its denoiser (``pipe.unet`` or
    ``pipe.transformer``), and :func:`remove` takes the pipeline too.

    ``input_scale`` (vision models) also downsamples every input: each image side is resized
    to that fraction (whole patches) on entry, with the position table interpolated by the
    framework (:mod:`tokenmerge.adapters.resize`). The caller keeps passing full-size images.

    Raises:
        ValueError: the model, one of its submodules or a model it is part of is already
            patched (call :func:`remove` on that one first).
        UnsupportedModelError: no adapter recognises the model; the message lists the families.
    """
    if not isinstance(method, Method):
        raise TypeError(f"expected a tokenmerge method (e.g. tm.ToMe(r=8)), got {method!r}")
    outer, model = model, denoiser(model)
    if getattr(model, ATTR, None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already patched with {getattr(model, ATTR).method}; "
            "call tokenmerge.remove(model) before applying another method"
        )
    for name, sub in model.named_modules():
        inner = vars(sub).get(ATTR)
        if inner is not None and sub is not model:
            raise ValueError(
                f"cannot patch {type(model).__name__}: its submodule {name!r} "
                f"({type(sub).__name__}) is already patched by tokenmerge ({inner.method.name}); "
                "call tokenmerge.remove on that submodule first"
            )
    adapter = adapter_for(model)
    if method.site not in adapter.sites:
        raise ValueError(
            f"{type(method).__name__} acts at the {method.site!r} site, which the "
            f"{adapter.family} adapter does not offer (it offers "
            f"{', '.join(sorted(adapter.sites))})"
        )
    patch = Patch(model, method, adapter.target_for(model, method), input_scale=input_scale)
    patch.install()
    return outer


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter responsible for ``model``.

    Raises:
        UnsupportedModelError: no adapter recognises the model; the message lists the families.
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"no tokenmerge adapter supports {type(model).__name__}. Supported families:\n  "
        + "\n  ".join(supported_families())
    )


def remove(model: Any) -> Any:
    """Undo :func:`apply`, restoring the original modules exactly; returns ``model``."""
    patch_of(model).release()
    return model


def patch_of(model: Any) -> Patch:
    """The :class:`Patch` attached to ``model`` (or to a pipeline's denoiser)."""
    model = denoiser(model)
    patch = getattr(model, ATTR, None)
    if patch is None:
        raise ValueError(f"{type(model).__name__} is not patched by tokenmerge")
    return patch


def state(model: nn.Module) -> TokenState:
    """Token state (sizes, sources, per-layer counts) of the latest forward in this thread."""
    st = patch_of(model).state
    if st is None:
        raise ValueError("the patched model has not run a forward pass in this thread yet")
    return st


def summary(model: nn.Module) -> dict[str, object]:
    """Token counts and analytic FLOPs reached by the latest forward in this thread.

    Returns ``tokens_in`` (mean real tokens per sample at the start), ``tokens_per_layer``
    (mean over the batch, after each patched layer),
    ``tokens_per_layer_std`` (spread across samples: non-zero for dynamic budgets),
    and ``flops_ratio`` against the unreduced model (see :mod:`tokenmerge.core.flops`),
    counting every sample of a padded batch at its own length.
    """
    st = state(model)
    counts = torch.stack([c.float() for c in st.tokens_per_layer], 1)  # [B, L]
    n0 = (
        torch.full((counts.shape[0],), float(st.n_orig))
        if st.tokens_in is None
        else st.tokens_in.float().cpu()
    )
    cost = patch_of(model).target.cost
    # padded batches: total FLOPs of every sample at its own length
    reduced = sum(cost.flops(float(a), c.tolist()) for a, c in zip(n0, counts.cpu(), strict=True))
    full = sum(cost.flops(float(a), [float(a)] * cost.depth) for a in n0)
    return {
        "tokens_in": n0.mean().item(),
        "tokens_per_layer": counts.mean(0).tolist(),
        "tokens_per_layer_std": counts.std(0, unbiased=False).tolist(),
        "flops_ratio": reduced / full,
    }


@contextmanager
def patched(model: Any, method: Method, *, input_scale: float | None = None) -> Iterator[Any]:
    """``with tm.patched(model, tm.ToMe(r=8)): ...`` applies on entry and removes on exit."""
    apply(model, method, input_scale=input_scale)
    try:
        yield model
    finally:
        remove(model)
