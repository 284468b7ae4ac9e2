"""``tokenmerge bench --model sd15-unet-random`` (or ``sdxl-unet-random``, or ``hf:NAME --kind
diffusion``): arguments -> :class:`DiffusionBenchConfig` -> files (``<out>/<name>.json``,
``.md``, ``.png``).

Options: ``--budgets`` ToMeSD ratios (default 0.3,0.5,0.6), ``--batch-size`` one batch size,
``--timing-runs`` timed pairs, ``--n`` random inputs per tiny model in the fidelity part;
``--param bench.NAME=VALUE`` for :data:`SETTINGS` (lists with ``,`` or ``/``:
``bench.resolutions=512,1024``, ``bench.batches=1,2``, ``bench.arch=tiny``,
``bench.device=cuda``, ``bench.dtype=float16``, ``bench.timing_warmup=1``,
``bench.fidelity_inputs=0`` to skip the fidelity part); ``--param tomesd.NAME=VALUE`` for
ToMeSD's other fields (``sx``, ``sy``, ``random``, ``max_downsample``, ``cross_attn``, ...).
``--quick`` is a smoke test in seconds on a CPU: ``bench.arch=tiny`` (the tiny UNet of the
model's layout), ratio 0.5, batch 1, one timed pair, 2 fidelity inputs; each can still be set.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

from .. import saved_run
from .bench import METHOD, RATIOS, DiffusionBenchConfig, planned_steps, validate

#: ``--quick``: a smoke test on the tiny UNet (seconds on a CPU)
QUICK: dict[str, Any] = {"arch": "tiny", "budgets": "0.5", "batches": (1,), "timing_runs": 1,
                         "n": 2}  # fmt: skip
#: ``--param bench.NAME=VALUE`` settings
SETTINGS = ("resolutions", "batches", "arch", "timing_warmup", "fidelity_inputs", "device",
            "dtype")  # fmt: skip
#: bench options that mean nothing here
_OTHER = ("dataset", "budgets_for", "saliency_images", "autotune_methods", "autotune_time",
          "tasks")  # fmt: skip


def _ints(name: str, value: Any) -> tuple[int, ...]:
    """``512`` or ``"512,1024"`` / ``"512/1024"`` -> ``(512, 1024)``."""
    if isinstance(value, tuple):  # a --quick default
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    try:
        return tuple(int(v) for v in re.split(r"[,/]", str(value)) if v.strip())
    except ValueError:
        raise ValueError(
            f"bench.{name} takes whole numbers separated by commas (e.g. 512,1024); got {value!r}"
        ) from None


def _ratio(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        example = ",".join(map(str, RATIOS))
        raise ValueError(
            "--budgets for the diffusion bench are ToMeSD ratios (the share of each patched "
            f"block's tokens merged) from 0 to 0.75, e.g. {example}; got {text!r}"
        ) from None


def config(args: argparse.Namespace) -> DiffusionBenchConfig:
    """The run's configuration from the CLI arguments, checked (before anything loads)."""
    from ...cli.checks import parse_params

    for k in _OTHER:
        if getattr(args, k, None):
            raise ValueError(f"--{k.replace('_', '-')} does not apply to the diffusion bench")
    if args.methods and [m.strip() for m in args.methods.split(",")] != [METHOD]:
        raise ValueError(
            f"the diffusion bench measures {METHOD} only; got --methods {args.methods}"
        )
    params = parse_params(args.param or [], settings={"bench": SETTINGS})
    bench = params.pop("bench", {})
    unknown = sorted(set(params) - {METHOD})
    if unknown:
        raise ValueError(f"--param for methods not benchmarked: {unknown} (only {METHOD})")
    if args.batch_size and "batches" in bench:
        raise ValueError("give --batch-size or --param bench.batches, not both")
    if args.n and "fidelity_inputs" in bench:
        raise ValueError("give --n or --param bench.fidelity_inputs, not both")
    if getattr(args, "quick", False):
        bench.setdefault("arch", QUICK["arch"])
        if not args.batch_size:
            bench.setdefault("batches", QUICK["batches"])
        for k in ("budgets", "timing_runs"):
            if getattr(args, k, None) is None:
                setattr(args, k, QUICK[k])
        bench.setdefault("fidelity_inputs", args.n or QUICK["n"])
    d = DiffusionBenchConfig()
    batches = (args.batch_size,) if args.batch_size else d.batches
    cfg = DiffusionBenchConfig(
        model=args.model,
        ratios=tuple(_ratio(b) for b in args.budgets.split(",")) if args.budgets else d.ratios,
        resolutions=_ints("resolutions", bench["resolutions"]) if "resolutions" in bench else (),
        batches=_ints("batches", bench["batches"]) if "batches" in bench else batches,
        arch=str(bench.get("arch", d.arch)),
        timing_runs=args.timing_runs or d.timing_runs,
        timing_warmup=bench.get("timing_warmup", d.timing_warmup),
        fidelity_inputs=bench.get("fidelity_inputs", args.n or d.fidelity_inputs),
        device=str(bench.get("device", d.device)),
        dtype=str(bench.get("dtype", d.dtype)),
        seed=args.seed,
        method_params=params.get(METHOD, {}),
    )
    validate(cfg)
    return cfg


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for diffusion denoisers (called by the CLI)."""
    from .bench import run

    cfg = config(args)
    return write(args, cfg, saved_run.with_progress(planned_steps(cfg), lambda t: run(cfg, t)))


#: the parts of a run's result kept in the JSON's ``meta``
SAVED = (
    "fidelity",
    "method",
    "timed_model",
    "params",
    "resolutions",
    "other_load",
    "other_load_mean",
)


def write(args: argparse.Namespace, cfg: DiffusionBenchConfig, result: dict[str, Any]) -> int:
    """``<out>/<name>.json``, ``.md`` and ``.png``."""
    from importlib import metadata

    import torch

    from .. import report
    from .report import markdown, plot

    conf = {"bench": "diffusion", **dataclasses.asdict(cfg)}
    meta = saved_run.meta_of(cfg.seed, conf, result, SAVED)
    meta["versions"]["diffusers"] = metadata.version("diffusers")
    if cfg.device != "cpu":
        meta["machine"]["device"] = f"{cfg.device} ({torch.cuda.get_device_name(cfg.device)})"
    stem = saved_run.stem(args.name, cfg.model + ("-tiny" if cfg.arch == "tiny" else ""))
    path = report.save(args.out, stem, meta, result["rows"], markdown(cfg, result, meta))
    plot(cfg, result, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('')}.json, .md, .png")
    return 0


def load(path: str | Path) -> tuple[DiffusionBenchConfig, dict[str, Any], dict[str, Any]]:
    """``(config, result, meta)`` of a saved run."""
    conf, result, meta = saved_run.read(path, DiffusionBenchConfig, SAVED)
    return DiffusionBenchConfig(**conf), result, meta


def render(path: str | Path) -> list[str]:
    """Remake the Markdown and the plot of a saved run with the current report code; returns
    the suffixes written."""
    from .report import markdown, plot

    return saved_run.rerender(path, load, markdown, plot)
