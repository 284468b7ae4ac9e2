"""Vision parts: ToMe and autotuned plans on timm ViT-B/16 and ViT-L/16 (random weights,
timed against the unpatched model), and ToMe's CLS fidelity on DINOv2-S (real weights)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...api import patched, summary
from ...methods import ToMe
from ...methods.base import Method
from ...tune import autotune
from ..throughput import Timing, interleave, toggle
from .config import Clock, Device, GpuBenchConfig, VitSpec, dtype_of
from .report import Recorder, attempt

SPEED, FIDELITY = "vision-speed", "vision-fidelity"


def build_vit(spec: VitSpec, dev: Device, seed: int) -> nn.Module:
    """``spec``'s timm ViT with random weights, built on the device in float32.

    ``dynamic_img_size=True`` lets autotuned plans shrink the input; at the native size it
    changes nothing (the position table is used as it is)."""
    import timm

    torch.manual_seed(seed)
    with dev.torch:
        model = timm.create_model(
            spec.arch, pretrained=False, dynamic_img_size=True, **spec.overrides
        )
    return model.eval()


def _native(model: nn.Module) -> tuple[int, int]:
    h, w = model.patch_embed.img_size
    return int(h), int(w)


def _pixels(n: int, size: tuple[int, int], seed: int, dev: Device, dtype: torch.dtype) -> Tensor:
    """``n`` seeded random images (speed does not depend on the pixels either)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=g).to(dev.torch, dtype)


def timed(
    model: nn.Module,
    method: Method,
    input_scale: float | None,
    x: Tensor,
    cfg: GpuBenchConfig,
    dev: Device,
) -> dict[str, Any]:
    """Interleaved pairs, unpatched against patched, on the same model and batch: the
    speed-up, images/s and what the patched forwards reached (tokens, FLOPs)."""
    seen: dict[str, Any] = {}
    switch = toggle(model, method, input_scale)

    def between(on: bool) -> None:
        if not on:
            try:
                seen.update(summary(model))
            except BaseException:
                switch(False)
                raise
        switch(on)

    def step() -> None:
        model(x)
        dev.sync()  # a CUDA forward returns before its kernels end

    t = interleave(step, step, len(x), cfg.timing_runs, cfg.timing_warmup, between=between)
    return {
        **_timing(t),
        "tokens_in": seen.get("tokens_in"),
        "tokens_out": (seen.get("tokens_per_layer") or [None])[-1],
        "flops_ratio": seen.get("flops_ratio"),
    }


def _timing(t: Timing) -> dict[str, Any]:
    return {
        "speedup": t.ratio,
        "speedup_iqr": list(t.iqr) if t.iqr else None,
        "within_noise": t.within_noise,
        "base_ms": 1e3 * t.base_s,
        "ms": 1e3 * t.reduced_s,
        "base_img_s": t.base_items_per_s,
        "img_s": t.reduced_items_per_s,
        "pair_ratios": list(t.ratios),
        "other_load": t.other_load,
    }


def _models(cfg: GpuBenchConfig, dev: Device) -> Iterator[tuple[VitSpec, str, nn.Module]]:
    """Every (architecture, dtype): one model per architecture, cast per dtype."""
    for spec in cfg.vits:
        model = build_vit(spec, dev, cfg.seed)
        try:
            for dt in cfg.dtypes:
                yield spec, dt, model.to(dtype_of(dt))
        finally:
            del model
            dev.free()


def _key(spec: VitSpec, dt: str, cfg: GpuBenchConfig) -> dict[str, Any]:
    return {
        "part": SPEED,
        "model": spec.label,
        "arch": spec.arch,
        "dtype": dt,
        "batch": cfg.batch_size,
        "overrides": dict(spec.overrides),
    }


def speed(cfg: GpuBenchConfig, dev: Device, clock: Clock, rec: Recorder) -> None:
    """ToMe at each architecture's budgets, in every dtype."""
    for spec, dt, model in _models(cfg, dev):
        size = _native(model)
        x = _pixels(cfg.batch_size, size, cfg.seed, dev, dtype_of(dt))
        for r in spec.budgets:
            key = {
                **_key(spec, dt, cfg),
                "method": "tome",
                "budget": f"r={r}",
                "r": r,
                "input_size": list(size),
            }
            run = functools.partial(timed, model, ToMe(r=r), None, x, cfg, dev)
            attempt(rec, clock, dev, model, key, run)


def autotuned(cfg: GpuBenchConfig, dev: Device, clock: Clock, rec: Recorder) -> None:
    """A plan per speed-up target from :func:`tokenmerge.autotune` (a short search on random
    images), then timed like the ToMe rows."""
    for spec, dt, model in _models(cfg, dev):
        size = _native(model)
        dtype = dtype_of(dt)
        images = _pixels(cfg.autotune_images, size, cfg.seed + 1, dev, dtype)
        x = _pixels(cfg.batch_size, size, cfg.seed, dev, dtype)
        for target in cfg.autotune_targets:
            key = {
                **_key(spec, dt, cfg),
                "method": "autotune",
                "budget": f"{target:g}x",
                "target": target,
            }
            run = _autotune_row(model, images, x, target, cfg, dev)
            attempt(rec, clock, dev, model, key, run)


def _autotune_row(
    model: nn.Module, images: Tensor, x: Tensor, target: float, cfg: GpuBenchConfig, dev: Device
) -> Callable[[], dict[str, Any]]:
    def forward(m: nn.Module, pixels: Tensor) -> Any:
        out = m(pixels)
        dev.sync()  # autotune times this forward
        return out

    def run() -> dict[str, Any]:
        plan = autotune(
            model,
            images,
            speedup=target,
            batch_size=cfg.batch_size,
            time_budget=cfg.autotune_time,
            forward=forward,
            progress=False,
            seed=cfg.seed,
        )
        row = timed(model, plan.to_method(), plan.input_scale, x, cfg, dev)
        row["flops_ratio"] = plan.flops_ratio  # against the native size (the summary's is not)
        return {
            **row,
            "input_size": list(plan.input_size),
            "schedule": list(plan.schedule),
            "plan_method": plan.method,
            "plan_speedup": plan.speedup,
            "search_s": plan.search.get("seconds"),
            "candidates": plan.search.get("candidates"),
        }

    return run


# ------------------------------------------------------------------------------ fidelity
@torch.inference_mode()
def _cls(model: nn.Module, x: Tensor) -> Tensor:
    return model(pixel_values=x).last_hidden_state[:, 0].float()


def _cosines(a: Tensor, b: Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).cpu()
    return {
        "cos": float(cos.mean()),
        "cos_p05": float(torch.quantile(cos, 0.05)),
        "cos_min": float(cos.min()),
    }


def fidelity(cfg: GpuBenchConfig, dev: Device, clock: Clock, rec: Recorder) -> None:
    """CLS cosine of ToMe against the unreduced model, on DINOv2-S's real weights and real
    photos, in each dtype (and of each dtype's unreduced model against float32)."""
    try:
        from .. import data
        from ..zoo import load_vision

        vm = load_vision("dinov2-s", backend="hf", image_size=cfg.fidelity_size)
        photos = data.natural_crops(cfg.fidelity_images, seed=cfg.seed, size=vm.image_size)[0]
    except ImportError as e:  # the zoo's MissingPackageError is one
        rec.skip_part(FIDELITY, f"DINOv2-S fidelity skipped: {e}")
        return
    # anything else (a corrupted asset) is an error: the phase records it
    model = vm.model.to(dev.torch).eval()
    x = vm.preprocess(photos).to(dev.torch)
    ref = _cls(model, x)  # float32, unreduced
    p = vm.patch_size or 1
    n_tokens = (x.shape[-2] // p) * (x.shape[-1] // p) + vm.num_prefix_tokens
    key = {
        "part": FIDELITY,
        "model": "DINOv2-S",
        "images": len(photos),
        "attention": model.config._attn_implementation,
    }
    for dt in cfg.dtypes:
        m = copy.deepcopy(model).to(dtype_of(dt))
        xd = x.to(dtype_of(dt))
        base = _cls(m, xd)
        unreduced = {
            "tokens_out": n_tokens,
            **_cosines(base, base),
            "cos_fp32": _cosines(base, ref)["cos"],
        }
        attempt(
            rec,
            clock,
            dev,
            m,
            {**key, "dtype": dt, "r": 0, "budget": "r=0"},
            lambda row=unreduced: row,
        )
        for r in cfg.fidelity_budgets:
            run = functools.partial(_tome_fidelity, m, xd, r, base, ref)
            attempt(rec, clock, dev, m, {**key, "dtype": dt, "r": r, "budget": f"r={r}"}, run)
    dev.free()


def _tome_fidelity(m: nn.Module, x: Tensor, r: int, base: Tensor, ref: Tensor) -> dict[str, Any]:
    with patched(m, ToMe(r=r)):
        out = _cls(m, x)
        s = summary(m)
    return {
        "tokens_in": s["tokens_in"],
        "tokens_out": s["tokens_per_layer"][-1],
        "flops_ratio": s["flops_ratio"],
        **_cosines(out, base),
        "cos_fp32": _cosines(out, ref)["cos"],
    }


__all__ = ["FIDELITY", "SPEED", "autotuned", "build_vit", "fidelity", "speed", "timed"]
