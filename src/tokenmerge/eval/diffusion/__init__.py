"""The diffusion benchmark (``tokenmerge bench --model sd15-unet-random``): ToMeSD's step
speed-up on the full-size SD-1.5 and SDXL UNet architectures (random weights: speed does not
depend on them) and its fidelity on tiny random UNet, DiT, PixArt and SD3 models."""

from .bench import (
    FIDELITY,
    MODELS,
    RATIOS,
    DiffusionBenchConfig,
    fidelity,
    planned_steps,
    run,
    speed,
    validate,
)

__all__ = [
    "FIDELITY",
    "MODELS",
    "RATIOS",
    "DiffusionBenchConfig",
    "fidelity",
    "planned_steps",
    "run",
    "speed",
    "validate",
]
