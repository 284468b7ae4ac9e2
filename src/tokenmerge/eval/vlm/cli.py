"""``tokenmerge bench --model tiny-llava``: arguments -> :class:`VLMBenchConfig` -> files
(``<out>/<name>.json``, ``.md``, ``.png``).

``--tasks video`` (alone, or with ``accuracy`` / ``speed``) asks about video clips instead of
images: ``--budgets`` are then the % of each clip's visual tokens kept (default 50,25,10,5) and
``--param bench.frames=N`` sets the frames per clip (default 8)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import saved_run
from .bench import KEEPS, PCTS, TASKS, VIDEO, VLMBenchConfig, planned_steps, validate

#: ``--quick``: a smoke test (3 methods, one budget, 10 questions, one timing pair)
QUICK: dict[str, Any] = {"n": 10, "budgets": "57", "methods": "random_proj,visionzip_proj,fastv",
                         "timing_runs": 1}  # fmt: skip
#: ``--quick --tasks video``: the same size on 8-frame clips, with the video baselines
QUICK_VIDEO: dict[str, Any] = {"n": 10, "budgets": "25", "timing_runs": 1,
                               "methods": "frame_subsample,random_proj,fastv"}  # fmt: skip
#: ``--full``: the published size
FULL_N = 500
#: the zoo models the bench runs on (``--tasks video`` takes ``tiny-llava`` as
#: ``tiny-llava-video``: the same model with the projector trained on clips)
MODELS = ("tiny-llava", "tiny-llava-video")
#: ``--param bench.NAME=VALUE`` settings
SETTINGS = ("max_new_tokens", "decode_tokens", "timing_warmup", "split", "same_length", "frames")
#: bench options that mean nothing here
_OTHER = ("dataset", "budgets_for", "saliency_images", "autotune_methods", "autotune_time")


def _keep(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        example = ",".join(map(str, KEEPS))
        raise ValueError(
            f"--budgets for VLMs are visual tokens kept per image, e.g. {example}; got {text!r}"
        ) from None


def _pct(text: str) -> float:
    try:
        pct = float(text.strip())
    except ValueError:
        example = ",".join(f"{p:g}" for p in PCTS)
        raise ValueError(
            f"--budgets for --tasks video are the % of each clip's visual tokens kept, whole "
            f"or decimal numbers above 0 and below 100, e.g. {example}; got {text!r}"
        ) from None
    return int(pct) if pct.is_integer() else pct


def config(args: argparse.Namespace) -> VLMBenchConfig:
    """The run's configuration from the CLI arguments, checked (before anything loads)."""
    from ...cli.checks import parse_params

    for k in _OTHER:
        if getattr(args, k, None):
            raise ValueError(f"--{k.replace('_', '-')} does not apply to the VLM bench")
    if args.model not in MODELS:
        raise ValueError(
            f"the VLM bench runs on the zoo's {' or '.join(MODELS)}, not {args.model!r}"
        )
    params = parse_params(args.param or [], settings={"bench": SETTINGS})
    bench = params.pop("bench", {})
    tasks = frozenset(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    video = VIDEO in tasks
    # the video task measures tiny-llava with the projector that learnt the clips' questions
    model = "tiny-llava-video" if video and args.model == "tiny-llava" else args.model
    if "frames" in bench and not video:
        raise ValueError("--param bench.frames applies to --tasks video only")
    if getattr(args, "quick", False):
        preset = QUICK_VIDEO if video else QUICK
        for k in ("n", "budgets", "methods", "timing_runs"):
            if getattr(args, k, None) is None:
                setattr(args, k, preset[k])
    # None: the task's defaults (VLMBenchConfig)
    methods = (
        tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    )
    parse = _pct if video else _keep
    keeps = tuple(parse(b) for b in args.budgets.split(",")) if args.budgets else None
    d = VLMBenchConfig()
    n = args.n or (FULL_N if getattr(args, "full", False) else d.n)
    cfg = VLMBenchConfig(
        model=model,
        methods=methods,
        keeps=keeps,
        n=n,
        split=str(bench.get("split", d.split)),
        batch_size=args.batch_size or d.batch_size,
        max_new_tokens=int(bench.get("max_new_tokens", d.max_new_tokens)),
        decode_tokens=int(bench.get("decode_tokens", d.decode_tokens)),
        timing_runs=args.timing_runs or d.timing_runs,
        timing_warmup=int(bench.get("timing_warmup", d.timing_warmup)),
        same_length=bool(bench.get("same_length", d.same_length)),
        frames=bench.get("frames", d.frames),  # checked by validate
        seed=args.seed,
        tasks=tasks,
    )
    cfg.method_params = {k: v for k, v in params.items() if k in cfg.methods}
    validate(cfg)
    return cfg


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for VLMs (called by the CLI)."""
    from .bench import run

    cfg = config(args)
    return write(args, cfg, saved_run.with_progress(planned_steps(cfg), lambda t: run(cfg, t)))


#: the parts of a run's result kept in the JSON's ``meta``
SAVED = ("questions", "n_by_type", "chance", "timing_question", "other_load", "other_load_mean",
         "llm_depth")  # fmt: skip


def _config_json(cfg: VLMBenchConfig) -> dict[str, Any]:
    out = {}
    for k, v in vars(cfg).items():
        out[k] = sorted(v) if isinstance(v, frozenset) else list(v) if isinstance(v, tuple) else v
    if not cfg.video:  # a video setting: an image run's JSON stays as it was
        del out["frames"]
    return out


def write(args: argparse.Namespace, cfg: VLMBenchConfig, result: dict[str, Any]) -> int:
    """``<out>/<name>.json``, ``.md`` and ``.png``."""
    from .. import report
    from .report import markdown

    meta = saved_run.meta_of(cfg.seed, _config_json(cfg), result, SAVED)
    stem = saved_run.stem(args.name, cfg.model)
    path = report.save(args.out, stem, meta, result["rows"], markdown(cfg, result, meta))
    written = ".json, .md" + (", .png" if _plot(cfg, result, path.with_suffix(".png")) else "")
    print(f"wrote {path.with_suffix('')}{written}")
    return 0


def load(path: str | Path) -> tuple[VLMBenchConfig, dict[str, Any], dict[str, Any]]:
    """``(config, result, meta)`` of a saved run."""
    conf, result, meta = saved_run.read(path, VLMBenchConfig, SAVED)
    cfg = VLMBenchConfig(**conf | {"tasks": frozenset(conf.get("tasks", TASKS))})
    return cfg, result, meta


def render(path: str | Path) -> list[str]:
    """Remake the Markdown (and the plot) of a saved run with the current report code; returns
    the suffixes written."""
    from .report import markdown

    return saved_run.rerender(path, load, markdown, _plot)


def _plot(cfg: VLMBenchConfig, result: dict[str, Any], path: Path) -> bool:
    """The accuracy plot; False (nothing drawn) for a run that measured no accuracy."""
    from .report import plot

    if all(r.get("acc") is None for r in result["rows"]):
        return False
    what = (
        f"% of the visual tokens kept ({cfg.frames}-frame clips)"
        if cfg.video
        else "visual tokens kept"
    )
    plot(result, path, f"{cfg.model}: accuracy against {what}", video=cfg.video)
    return True
