"""``tokenmerge bench --model tiny-llava``: arguments -> :class:`VLMBenchConfig` -> files
(``<out>/<name>.json``, ``.md``, ``.png``)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from .bench import KEEPS, METHODS, TASKS, VLMBenchConfig, planned_steps, validate

#: ``--quick``: a smoke test (3 methods, one budget, 10 questions, one timing pair)
QUICK: dict[str, Any] = {"n": 10, "budgets": "57", "methods": "random_proj,visionzip_proj,fastv",
                         "timing_runs": 1}  # fmt: skip
#: ``--full``: the published size
FULL_N = 500
#: ``--param bench.NAME=VALUE`` settings
SETTINGS = ("max_new_tokens", "decode_tokens", "timing_warmup", "split", "same_length")
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


def config(args: argparse.Namespace) -> VLMBenchConfig:
    """The run's configuration from the CLI arguments, checked (before anything loads)."""
    from ...cli.checks import parse_params

    for k in _OTHER:
        if getattr(args, k, None):
            raise ValueError(f"--{k.replace('_', '-')} does not apply to the VLM bench")
    if args.model != "tiny-llava":
        raise ValueError(f"the VLM bench runs on the zoo's tiny-llava, not {args.model!r}")
    params = parse_params(args.param or [], settings={"bench": SETTINGS})
    bench = params.pop("bench", {})
    quick = getattr(args, "quick", False)
    if quick:
        for k in ("n", "budgets", "methods", "timing_runs"):
            if getattr(args, k, None) is None:
                setattr(args, k, QUICK[k])
    methods = tuple(m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip())
    keeps = tuple(_keep(b) for b in args.budgets.split(",")) if args.budgets else KEEPS
    tasks = frozenset(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    d = VLMBenchConfig()
    n = args.n or (FULL_N if getattr(args, "full", False) else d.n)
    cfg = VLMBenchConfig(
        model=args.model,
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
        seed=args.seed,
        tasks=tasks,
        method_params={k: v for k, v in params.items() if k in methods},
    )
    validate(cfg)
    return cfg


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for VLMs (called by the CLI)."""
    from tqdm import tqdm

    from .bench import run

    cfg = config(args)
    with tqdm(total=planned_steps(cfg), desc="bench", unit="step", file=sys.stderr) as bar:
        result = run(cfg, bar.update)
    return write(args, cfg, result)


#: the parts of a run's result kept in the JSON's ``meta``
SAVED = ("questions", "n_by_type", "chance", "timing_question", "other_load", "other_load_mean",
         "llm_depth")  # fmt: skip


def _config_json(cfg: VLMBenchConfig) -> dict[str, Any]:
    out = {}
    for k, v in vars(cfg).items():
        out[k] = sorted(v) if isinstance(v, frozenset) else list(v) if isinstance(v, tuple) else v
    return out


def write(args: argparse.Namespace, cfg: VLMBenchConfig, result: dict[str, Any]) -> int:
    """``<out>/<name>.json``, ``.md`` and ``.png``."""
    from .. import report
    from .report import markdown, plot

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or re.sub(r"[^A-Za-z0-9._-]", "_", cfg.model)
    meta = report.provenance(cfg.seed)
    meta["config"] = _config_json(cfg)
    for k in SAVED:
        meta[k] = result[k]
    report.write_json(out / f"{stem}.json", meta, result["rows"])
    (out / f"{stem}.md").write_text(markdown(cfg, result, meta))
    written = ".json, .md"
    if any(r.get("acc") is not None for r in result["rows"]):
        plot(result, out / f"{stem}.png", f"{cfg.model}: accuracy against visual tokens kept")
        written += ", .png"
    print(f"wrote {out / stem}{written}")
    return 0


def load(path: str | Path) -> tuple[VLMBenchConfig, dict[str, Any], dict[str, Any]]:
    """``(config, result, meta)`` of a saved run."""
    import json

    saved = json.loads(Path(path).read_text())
    meta, fields = saved["meta"], {f.name for f in dataclasses.fields(VLMBenchConfig)}
    conf = {k: v for k, v in meta["config"].items() if k in fields}
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in conf.items()}
    cfg = VLMBenchConfig(**conf | {"tasks": frozenset(conf.get("tasks", TASKS))})
    return cfg, {"rows": saved["rows"], **{k: meta.get(k) for k in SAVED}}, meta


def render(path: str | Path) -> list[str]:
    """Remake the Markdown (and the plot) of a saved run with the current report code; returns
    the suffixes written."""
    from .report import markdown, plot

    path = Path(path)
    cfg, result, meta = load(path)
    path.with_suffix(".md").write_text(markdown(cfg, result, meta))
    if any(r.get("acc") is not None for r in result["rows"]):
        plot(result, path.with_suffix(".png"), f"{cfg.model}: accuracy against visual tokens kept")
        return [".md", ".png"]
    return [".md"]
