"""The diffusion benchmark: ToMeSD (tomesd-style merge -> attention -> unmerge) in a diffusion
denoiser, against the unpatched model.

**Speed** is measured on the published architectures of Stable Diffusion 1.5's and SDXL's
UNets with random weights (no weights ship offline; a step takes the same time whatever the
weights): for each resolution, batch size and ratio, one denoising step (one UNet forward
under ``torch.inference_mode``) of the patched model against the unpatched one, as
interleaved pairs on the same inputs (:func:`~tokenmerge.eval.throughput.interleave`: median
ratio, its interquartile range, the cores other processes took). ToMeSD is applied to and
removed from the one model between the runs: SDXL in float32 is about 10 GB. The token
counts of every patched block come from the adapter's record of the latest forward.

**Fidelity** is measured on tiny random configurations of the four families the adapter
patches (an SD-like and an SDXL-like UNet, DiT, PixArt, SD3): the cosine similarity between
the patched and unpatched outputs, per input, for each ratio. Random weights say how much a
ratio perturbs the computation, not what it does to images.

``arch="tiny"`` (``--quick``) times the tiny UNet of the same layout in place of the full one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from ...api import apply, remove
from ...methods.base import Method
from .. import report
from ..throughput import interleave
from ..zoo.diffusion import NATIVE, TINY, DiffusionInputs, load_diffusion

#: the zoo models the bench times (``hf:NAME`` too: a UNet2DConditionModel with weights)
MODELS: tuple[str, ...] = ("sd15-unet-random", "sdxl-unet-random")
#: tomesd's table: the share of each patched block's tokens merged
RATIOS: tuple[float, ...] = (0.3, 0.5, 0.6)
BATCHES: tuple[int, ...] = (1, 2)
#: ``full``: the published architecture; ``tiny``: the tiny UNet of the same layout
ARCHS: tuple[str, ...] = ("full", "tiny")
TINY_OF: dict[str, str] = {"sd15-unet-random": "tiny-unet", "sdxl-unet-random": "tiny-sdxl-unet"}
#: the tiny configurations of the fidelity part, one per family (and UNet layout)
FIDELITY: tuple[str, ...] = tuple(TINY)
#: resolutions in pixels: multiples of this, from it up to :data:`MAX_RESOLUTION`
RES_STEP, MAX_RESOLUTION = 64, 4096
DEVICES, DTYPES = ("cpu", "cuda"), ("float32", "float16", "bfloat16")
METHOD = "tomesd"


@dataclass
class DiffusionBenchConfig:
    """One run of the diffusion bench (``tokenmerge bench --model sd15-unet-random``)."""

    model: str = "sd15-unet-random"
    ratios: tuple[float, ...] = RATIOS
    resolutions: tuple[int, ...] = ()  # (): the model's own (NATIVE; hf: sample_size x 8)
    batches: tuple[int, ...] = BATCHES
    arch: str = "full"
    timing_runs: int = 5
    timing_warmup: int = 1  # untimed pairs before a resolution and batch's first ratio
    fidelity_inputs: int = 4  # random inputs per tiny model (0: no fidelity part)
    device: str = "cpu"  # the speed part's (the fidelity part runs on the CPU)
    dtype: str = "float32"  # the speed part's
    seed: int = 0
    method_params: dict[str, Any] = field(default_factory=dict)  # ToMeSD's fields but ratio


def max_ratio(params: dict[str, Any]) -> float:
    """The largest ratio ToMeSD accepts with these ``sx``, ``sy`` (one token of every cell
    stays a destination)."""
    return 1.0 - 1.0 / (int(params.get("sx", 2)) * int(params.get("sy", 2)))


def _whole(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")


def validate(cfg: DiffusionBenchConfig) -> None:
    """Refuse a bad configuration, naming the accepted values, before anything loads."""
    hub = cfg.model.startswith("hf:")
    if cfg.model not in MODELS and not (hub and len(cfg.model) > 3):
        raise ValueError(
            f"the diffusion bench runs on {', '.join(MODELS)} or hf:NAME (a UNet2DConditionModel: "
            f"a hub id or a local folder), not {cfg.model!r}"
        )
    if cfg.arch not in ARCHS:
        raise ValueError(f"bench.arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if hub and cfg.arch == "tiny":
        raise ValueError(f"bench.arch=tiny applies to {', '.join(MODELS)}, not {cfg.model!r}")
    most = max_ratio(cfg.method_params)
    if not cfg.ratios:
        raise ValueError("--budgets: give at least one ratio")
    for r in cfg.ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= most:
            raise ValueError(
                f"--budgets are ToMeSD ratios (the share of each patched block's tokens merged) "
                f"from 0 to {most:g}; got {r!r}"
            )
    for res in cfg.resolutions:
        if (
            isinstance(res, bool)
            or not isinstance(res, int)
            or res % RES_STEP
            or not RES_STEP <= res <= MAX_RESOLUTION
        ):
            raise ValueError(
                f"bench.resolutions are image sides in pixels, multiples of {RES_STEP} from "
                f"{RES_STEP} to {MAX_RESOLUTION} (e.g. 512,1024); got {res!r}"
            )
    if not cfg.batches:
        raise ValueError("bench.batches: give at least one batch size")
    for b in cfg.batches:
        _whole("bench.batches", b, 1)
    _whole("--timing-runs", cfg.timing_runs, 1)
    _whole("bench.timing_warmup", cfg.timing_warmup, 0)
    _whole("--n (random inputs per tiny model)", cfg.fidelity_inputs, 0)
    if cfg.device.split(":")[0] not in DEVICES:
        raise ValueError(f"bench.device must be cpu or cuda[:N], got {cfg.device!r}")
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"bench.device={cfg.device}: torch sees no CUDA device here")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"bench.dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    make_method(cfg, 0.0)  # ToMeSD's own checks of the --param values


def timed_model(cfg: DiffusionBenchConfig) -> str:
    """The model the speed part loads: the zoo name, its tiny stand-in, or ``hf:NAME``."""
    return TINY_OF[cfg.model] if cfg.arch == "tiny" else cfg.model


def resolutions(cfg: DiffusionBenchConfig, model: nn.Module | None = None) -> tuple[int, ...]:
    """The resolutions timed: the configured ones, else the model's own (a hub model's is
    its ``sample_size`` x 8, read from ``model``)."""
    if cfg.resolutions:
        return tuple(cfg.resolutions)
    name = timed_model(cfg)
    if name in NATIVE:
        return NATIVE[name]
    return (8 * int(model.config.sample_size),) if model is not None else (512,)


def planned_steps(cfg: DiffusionBenchConfig) -> int:
    """Progress steps: a timing per resolution, batch and ratio; a fidelity pass per tiny
    model."""
    timed = len(resolutions(cfg)) * len(cfg.batches) * len(cfg.ratios)
    return timed + (len(FIDELITY) if cfg.fidelity_inputs else 0)


def make_method(cfg: DiffusionBenchConfig, ratio: float) -> Method:
    """ToMeSD at ``ratio`` with the run's seed and ``--param tomesd.NAME=VALUE`` values."""
    from ...methods import REGISTRY

    params = {"seed": cfg.seed, **cfg.method_params, "ratio": float(ratio)}
    return REGISTRY[METHOD](**params)


def records(model: nn.Module) -> list[dict[str, Any]]:
    """The adapter's record of the latest forward: one dict per patched block, in run order."""
    from ...adapters.diffusers import runtime_of

    return [
        {"block": r.block, "downsample": int(r.downsample), "tokens": int(r.tokens),
         "kept": int(r.kept)}
        for r in runtime_of(model).last or []
    ]  # fmt: skip


def _merged(blocks: Sequence[dict[str, Any]], ratio: float) -> None:
    """A ratio above 0 that merged nothing is a bug, not a measurement."""
    if not blocks and ratio > 0:
        raise RuntimeError("ToMeSD is applied but no block recorded a forward")
    if ratio > 0 and all(b["kept"] == b["tokens"] for b in blocks):
        raise RuntimeError(
            f"ToMeSD at ratio {ratio} merged no token in any of {len(blocks)} blocks"
        )


def _summary(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The token counts of a row: the patched blocks grouped by level and count."""
    groups: dict[tuple[int, int, int], int] = {}
    for b in blocks:
        key = (b["downsample"], b["tokens"], b["kept"])
        groups[key] = groups.get(key, 0) + 1
    return {
        "patched_blocks": len(blocks),
        "tokens": blocks[0]["tokens"] if blocks else None,  # the first (finest) patched block
        "kept": blocks[0]["kept"] if blocks else None,
        "levels": [
            {"downsample": d, "tokens": n, "kept": k, "blocks": c}
            for (d, n, k), c in groups.items()
        ],
        "blocks": list(blocks),
    }


def _to(value: Any, device: str, dtype: torch.dtype) -> Any:
    """``value`` (a step's keyword arguments) on ``device``, floating tensors in ``dtype``."""
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if value.is_floating_point() else None)
    return value


def speed(
    cfg: DiffusionBenchConfig,
    model: nn.Module,
    inputs: DiffusionInputs,
    tick: Callable[[int], None],
) -> list[dict[str, Any]]:
    """A row per resolution, batch size and ratio: interleaved step times, patched against
    unpatched, on the same inputs."""
    dtype = getattr(torch, cfg.dtype)
    sync = torch.cuda.synchronize if cfg.device != "cpu" else (lambda: None)
    rows = []
    for res in resolutions(cfg, model):
        for bs in cfg.batches:
            kw = _to(inputs(bs, res, seed=cfg.seed), cfg.device, dtype)

            def step(kw: dict[str, Any] = kw) -> None:
                model(**kw)
                sync()  # a CUDA step ends when its kernels do

            for k, ratio in enumerate(cfg.ratios):
                method = make_method(cfg, ratio)
                # the shapes' first ratio warms the process up; the later ones find it warm
                warmup = cfg.timing_warmup if k == 0 else 0
                seen: list[dict[str, Any]] = []

                def switch(on: bool, method: Method = method, seen: list = seen) -> None:
                    if on:
                        apply(model, method)
                        return
                    try:
                        seen[:] = records(model)
                    finally:
                        remove(model)

                t = interleave(step, step, bs, cfg.timing_runs, warmup, switch)
                _merged(seen, ratio)
                rows.append(
                    {
                        "resolution": res,
                        "batch": bs,
                        "ratio": float(ratio),
                        "speedup": t.ratio,
                        "speedup_iqr": list(t.iqr) if t.iqr else None,
                        "within_noise": t.within_noise,
                        "base_s": t.base_s,
                        "patched_s": t.reduced_s,
                        "pair_ratios": list(t.ratios),
                        "other_load": t.other_load,
                        **_summary(seen),
                    }
                )
                tick(1)
    return rows


def fidelity(cfg: DiffusionBenchConfig, tick: Callable[[int], None]) -> list[dict[str, Any]]:
    """A row per tiny model and ratio: the cosine similarity of the patched and unpatched
    outputs (flattened per input), mean and lowest over ``cfg.fidelity_inputs`` inputs; a
    model the method's settings do not fit (e.g. ``max_downsample=1`` on the SDXL layout)
    gets a row with the refusal under ``"skipped"``."""
    rows: list[dict[str, Any]] = []
    for name in FIDELITY:
        model, inputs = load_diffusion(name, seed=cfg.seed)
        res = NATIVE[name][0]
        kw = inputs(cfg.fidelity_inputs, res, seed=cfg.seed + 1)
        with torch.inference_mode():
            base = model(**kw)[0].flatten(1)
            for ratio in cfg.ratios:
                try:
                    apply(model, make_method(cfg, ratio))
                except ValueError as e:  # a --param this family cannot take (max_downsample)
                    rows.append({"model": name, "family": type(model).__name__,
                                 "ratio": float(ratio), "skipped": str(e)})  # fmt: skip
                    continue
                try:
                    out = model(**kw)[0].flatten(1)
                    blocks = records(model)
                finally:
                    remove(model)
                _merged(blocks, ratio)
                cos = torch.nn.functional.cosine_similarity(out, base, dim=1).double()
                rows.append(
                    {
                        "model": name,
                        "family": type(model).__name__,
                        "resolution": res,
                        "ratio": float(ratio),
                        "cosine": float(cos.mean()),
                        "cosine_min": float(cos.min()),
                        "inputs": len(cos),
                        **{k: v for k, v in _summary(blocks).items() if k != "blocks"},
                    }
                )
        tick(1)
    return rows


def run(cfg: DiffusionBenchConfig, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the bench; returns ``{"rows": [speed rows], "fidelity": [rows], ...}``."""
    validate(cfg)
    tick = progress or (lambda k: None)
    name = timed_model(cfg)
    # the tiny models first: seconds, and a --param they refuse shows before the long part
    fid = fidelity(cfg, tick) if cfg.fidelity_inputs else []
    model, inputs = load_diffusion(name, seed=cfg.seed)
    if (cfg.device, cfg.dtype) != ("cpu", "float32"):  # (diffusers warns about any dtype cast)
        model.to(cfg.device, getattr(torch, cfg.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    rows = speed(cfg, model, inputs, tick)
    loads = [r["other_load"] for r in rows if r["other_load"] is not None]
    # ToMeSD's own settings (not the budget, nor the fields every method has)
    base = {f.name for f in fields(Method)} | {"ratio"}
    settings = report.method_params(make_method(cfg, 0.0), "")
    return {
        "rows": rows,
        "fidelity": fid,
        "method": {k: v for k, v in settings.items() if k not in base},
        "timed_model": name,
        "params": n_params,
        "resolutions": sorted({r["resolution"] for r in rows}),
        "other_load": max(loads) if loads else None,
        "other_load_mean": float(np.mean(loads)) if loads else None,
    }


def config_fields() -> set[str]:
    """The names of :class:`DiffusionBenchConfig`'s fields (reading a saved run back)."""
    return {f.name for f in fields(DiffusionBenchConfig)}
