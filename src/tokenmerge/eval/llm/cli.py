"""``tokenmerge bench --model smollm2-135m``: arguments -> :class:`LLMBenchConfig` -> files."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from ...methods.kv import KV_SCORERS
from .runner import TASKS, LLMBenchConfig, planned_steps

#: ``--quick``: a CI smoke test (every KV method, 2 trials of 512 tokens, one timing pair)
QUICK: dict[str, Any] = {
    "n": 2,
    "budgets": "2,8",
    "methods": ",".join(KV_SCORERS) + ",fastv",
    "timing_runs": 1,
    "lengths": (512,),
    "memory_lengths": (256, 512),
    "speed_length": 512,
    "continuation": 64,
    "decode_tokens": 16,
    "ppl_check": 1,
}
#: ``--param bench.NAME=VALUE`` settings (lists are separated by ``/``: lengths=1024/2048)
SETTINGS = (
    "lengths", "memory_lengths", "chunk", "window", "continuation", "speed_length",
    "decode_tokens", "chunked", "memory_budget", "ppl_check", "max_new_tokens", "workers",
    "aware",
)  # fmt: skip


def _ints(v: Any) -> tuple[int, ...]:
    return v if isinstance(v, tuple) else tuple(int(x) for x in str(v).split("/"))


def _factor(text: str, option: str) -> float:
    try:
        return float(text.strip().rstrip("x"))
    except ValueError:
        raise SystemExit(
            f"{option} for LLMs are compression factors like 2,4,8; got {text!r}"
        ) from None


def config(args: argparse.Namespace) -> LLMBenchConfig:
    """The run's configuration from the CLI arguments."""
    from ...cli.checks import check_methods, parse_method_budgets, parse_params

    if getattr(args, "batch_size", None):
        raise SystemExit("--batch-size does not apply to the LLM bench (one sequence at a time)")
    params = parse_params(args.param or [], settings={"bench": SETTINGS})
    bench = params.pop("bench", {})
    if args.quick:
        for k in ("n", "budgets", "methods", "timing_runs"):
            if getattr(args, k, None) is None:
                setattr(args, k, QUICK[k])
        for k in ("lengths", "memory_lengths", "speed_length", "continuation", "decode_tokens",
                  "ppl_check"):  # fmt: skip
            bench.setdefault(k, QUICK[k])
    methods = [m.strip() for m in (args.methods or ",".join(LLMBenchConfig.methods)).split(",")]
    check_methods(methods)
    factors = [_factor(f, "--budgets") for f in (args.budgets or "2,4,8").split(",")]
    per_method = parse_method_budgets(
        getattr(args, "budgets_for", None) or [],
        parse=lambda f: _factor(f, "--budgets-for"),
        accepted=methods,
    )
    tasks = frozenset(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    d = LLMBenchConfig()
    get = lambda k, cast: cast(bench.get(k, getattr(d, k)))  # noqa: E731
    return LLMBenchConfig(
        model=args.model,
        methods=methods,
        factors=factors,
        method_factors=per_method,
        method_params=params,
        corpora=tuple(c.strip() for c in args.dataset.split(",")) if args.dataset else d.corpora,
        lengths=get("lengths", _ints),
        trials=args.n or d.trials,
        continuation=get("continuation", int),
        max_new_tokens=get("max_new_tokens", int),
        ppl_check=get("ppl_check", int),
        chunk=get("chunk", int),
        window=get("window", int),
        chunked=get("chunked", bool),
        aware=get("aware", bool),
        memory_lengths=get("memory_lengths", _ints),
        memory_budget=get("memory_budget", int),
        speed_length=get("speed_length", int),
        decode_tokens=get("decode_tokens", int),
        timing_runs=args.timing_runs or d.timing_runs,
        workers=get("workers", int),
        seed=args.seed,
        tasks=tasks,
    )


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for decoder LLMs (called by the CLI)."""
    from tqdm import tqdm

    from .. import distributed
    from .bench import run, validate

    cfg = config(args)
    validate(cfg)
    with distributed.group() as grp:
        if not grp.main:  # rank 0 counts every rank's steps and writes the report
            run(cfg, grp=grp)
            return 0
        with tqdm(total=planned_steps(cfg), desc="bench", unit="step", file=sys.stderr) as bar:
            result = run(cfg, bar.update, grp)
    return write(args, cfg, result)


#: the parts of a run's result that :func:`write` keeps in the JSON's ``meta``
SAVED = ("base", "check", "memory", "trials", "speed_context")


def write(args: argparse.Namespace, cfg: LLMBenchConfig, result: dict[str, Any]) -> int:
    """``<out>/<name>.json`` and ``.md``."""
    from .. import report
    from .report import markdown

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or re.sub(r"[^A-Za-z0-9._-]", "_", cfg.model)
    meta = report.provenance(cfg.seed)
    meta["config"] = {
        k: (list(v) if isinstance(v, (tuple, frozenset)) else v)
        for k, v in vars(cfg).items()
        if k not in ("method_params",)
    } | {"method_params": result["method_params"], "tasks": sorted(cfg.tasks)}
    for k in SAVED:
        meta[k] = result[k]
    if len(result["ranks"]) > 1:
        meta["ranks"] = result["ranks"]
    report.write_json(out / f"{stem}.json", meta, result["rows"])
    (out / f"{stem}.md").write_text(markdown(cfg, result, meta))
    print(f"wrote {out / stem}.json, .md")
    return 0


def render(path: str | Path) -> str:
    """The Markdown report of a saved run (``<name>.json`` written by :func:`write`), made
    again with the current report code: a report's wording can change without re-running
    hours of trials, and the numbers stay those of the JSON."""
    import json

    from .report import markdown

    saved = json.loads(Path(path).read_text())
    meta, fields = saved["meta"], {f.name for f in dataclasses.fields(LLMBenchConfig)}
    conf = {k: v for k, v in meta["config"].items() if k in fields}
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in conf.items()}
    cfg = LLMBenchConfig(**conf | {"tasks": frozenset(conf["tasks"])})
    result = {"rows": saved["rows"], **{k: meta[k] for k in SAVED}}
    return markdown(cfg, result, meta)
