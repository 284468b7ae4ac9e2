"""``tokenmerge bench --model whisper-tiny-en``: arguments -> :class:`AudioBenchConfig` ->
files (``<out>/<name>.json``, ``.md``, ``.png``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .. import saved_run
from .bench import KEEPS, AudioBenchConfig, planned_steps, validate

#: ``--quick``: a smoke test (two methods, one budget, 12 clips, one timing pair)
QUICK: dict[str, Any] = {"n": 12, "budgets": "375", "methods": "tome,truncate", "timing_runs": 1}
#: ``--param bench.NAME=VALUE`` settings
SETTINGS = ("calibration", "max_new_tokens", "timing_warmup", "timing_batch")
#: bench options that mean nothing here
_OTHER = ("dataset", "budgets_for", "saliency_images", "autotune_methods", "autotune_time",
          "tasks", "full")  # fmt: skip


def _keep(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        example = ",".join(map(str, KEEPS))
        raise ValueError(
            f"--budgets for Whisper are tokens kept after the encoder, e.g. {example}; got {text!r}"
        ) from None


def config(args: argparse.Namespace) -> AudioBenchConfig:
    """The run's configuration from the CLI arguments, checked (before anything loads)."""
    from ...cli.checks import parse_params

    for k in _OTHER:
        if getattr(args, k, None):
            raise ValueError(f"--{k.replace('_', '-')} does not apply to the Whisper bench")
    params = parse_params(args.param or [], settings={"bench": SETTINGS})
    bench = params.pop("bench", {})
    if getattr(args, "quick", False):
        for k in ("n", "budgets", "methods", "timing_runs"):
            if getattr(args, k, None) is None:
                setattr(args, k, QUICK[k])
    d = AudioBenchConfig()
    methods = (
        tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if args.methods
        else d.methods
    )
    cfg = AudioBenchConfig(
        model=args.model,
        methods=methods,
        keeps=tuple(_keep(b) for b in args.budgets.split(",")) if args.budgets else d.keeps,
        n=args.n or d.n,
        batch_size=args.batch_size or d.batch_size,
        timing_runs=args.timing_runs or d.timing_runs,
        seed=args.seed,
        **{k: bench[k] for k in SETTINGS if k in bench},
    )
    cfg.method_params = {k: v for k, v in params.items() if k in cfg.methods}
    unknown = sorted(set(params) - set(cfg.methods))
    if unknown:
        raise ValueError(f"--param for methods not benchmarked: {unknown}")
    validate(cfg)
    return cfg


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for Whisper (called by the CLI)."""
    from .bench import run

    cfg = config(args)
    return write(args, cfg, saved_run.with_progress(planned_steps(cfg), lambda t: run(cfg, t)))


#: the parts of a run's result kept in the JSON's ``meta``
SAVED = ("data", "calibration_clips", "depth", "timing_clips", "unreduced_transcripts",
         "references", "examples", "other_load", "other_load_mean")  # fmt: skip


def write(args: argparse.Namespace, cfg: AudioBenchConfig, result: dict[str, Any]) -> int:
    """``<out>/<name>.json``, ``.md`` and ``.png``."""
    from .. import report
    from .report import markdown, plot

    conf = {"bench": "audio", **dataclasses.asdict(cfg)}
    meta = saved_run.meta_of(cfg.seed, conf, result, SAVED)
    stem = saved_run.stem(args.name, cfg.model)
    path = report.save(args.out, stem, meta, result["rows"], markdown(cfg, result, meta))
    plot(cfg, result, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('')}.json, .md, .png")
    return 0


def load(path: str | Path) -> tuple[AudioBenchConfig, dict[str, Any], dict[str, Any]]:
    """``(config, result, meta)`` of a saved run."""
    conf, result, meta = saved_run.read(path, AudioBenchConfig, SAVED)
    return AudioBenchConfig(**conf), result, meta


def render(path: str | Path) -> list[str]:
    """Remake the Markdown and the plot of a saved run with the current report code; returns
    the suffixes written."""
    from .report import markdown, plot

    return saved_run.rerender(path, load, markdown, plot)
