"""``tokenmerge bench | bench-compile | visualize | list``: a thin layer over
:mod:`tokenmerge.eval`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..adapters import UnsupportedModelError
from ..core.budget import parse_budget
from . import tune


def parse_params(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """``tome.prop_attn=false`` -> ``{"tome": {"prop_attn": False}}``."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        try:
            key, raw = item.split("=", 1)
            method, name = key.split(".", 1)
        except ValueError:
            raise SystemExit(f"--param expects METHOD.NAME=VALUE, got {item!r}") from None
        low = raw.lower()
        val: object = {"true": True, "false": False, "none": None}.get(low, raw)
        if val is raw:
            try:
                val = float(raw) if "." in raw else int(raw)
            except ValueError:
                val = raw
        out.setdefault(method, {})[name] = val
    return out


def parse_method_budgets(
    items: Sequence[str],
    parse: Callable[[str], Any] = parse_budget,
    accepted: Sequence[str] | None = None,
) -> dict[str, list]:
    """``pitome=keep:0.9,keep:0.8`` -> ``{"pitome": [KeepRatio(0.9), KeepRatio(0.8)]}``.

    ``parse`` reads one budget (the LLM bench's are compression factors); a METHOD that is not
    in ``accepted`` (when given: what the run benchmarks) is refused."""
    out = {}
    for item in items:
        method, sep, rest = item.partition("=")
        if not sep or not rest:
            raise SystemExit(f"--budgets-for expects METHOD=B1,B2,..., got {item!r}")
        if accepted is not None and method.strip() not in accepted:
            raise SystemExit(
                f"--budgets-for expects METHOD=B1,B2 with METHOD one of the benchmarked methods "
                f"({', '.join(accepted)}); got {item!r}"
            )
        out[method.strip()] = [parse(b) for b in rest.split(",")]
    return out


#: The kind of benchmark each zoo model gets; hub names need ``--kind``.
KINDS = {"dinov2-s": "vision", "minilm": "text", "smollm2-135m": "llm", "qwen2.5-coder-0.5b": "llm"}


def _bench(args: argparse.Namespace) -> int:
    kind = args.kind or KINDS.get(args.model)
    if kind is None:
        raise SystemExit(
            f"cannot tell what kind of model {args.model!r} is; pass --kind vision|text|llm"
        )
    if args.full and args.quick:
        raise SystemExit("--full and --quick exclude each other")
    for flag in ("baselines", "autotune", "plan", "full"):
        if getattr(args, flag) not in (None, False) and kind != "vision":
            raise SystemExit(f"--{flag} applies to vision benchmarks, not to {kind} ones")
    module = importlib.import_module(f"tokenmerge.eval.{kind}")
    return module.cli_main(args)


def _visualize(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..api import apply, state
    from ..eval import zoo
    from ..eval.visualize import save_overlay
    from ..methods import get_method

    vm = zoo.load_vision(args.model, backend=args.backend)
    img = Image.open(args.image).convert("RGB")
    pixels = vm.preprocess([img], resize="crop")
    apply(vm.model, get_method(args.method, r=parse_budget(args.budget)))
    with torch.inference_mode():
        vm.tokens(pixels)
    # the image exactly as the model saw it (undo the normalisation)
    mean = torch.tensor(vm.mean).view(3, 1, 1)
    std = torch.tensor(vm.std).view(3, 1, 1)
    seen = ((pixels[0] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    out = args.out or str(Path(args.image).with_suffix("")) + f"-{args.method}.png"
    save_overlay(np.ascontiguousarray(seen), state(vm.model), out)
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from ..eval.llm.cli import render
    from ..eval.vision.cli import render as render_vision

    for name in args.json:
        path = Path(name)
        if path.suffix != ".json" or not path.is_file():
            raise SystemExit(f"{name!r} is not a saved bench result (a .json file)")
        config = json.loads(path.read_text())["meta"].get("config", {})
        if "dataset" in config:
            raise SystemExit(
                f"{name!r} is a single-dataset vision run from before the per-dataset report; "
                "rerun the command in its 'meta' to remake it"
            )
        if "datasets" in config:  # a vision run
            written = render_vision(path)
        else:
            path.with_suffix(".md").write_text(render(path))
            written = [".md"]
        print(f"wrote {path.with_suffix('')}" + ", ".join(written))
    return 0


def _list(args: argparse.Namespace) -> int:
    from ..api import supported_families
    from ..methods import REGISTRY
    from ..zoo import CATALOG, describe

    print("methods:")
    for name, cls in sorted(REGISTRY.items()):
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph
        print(f"  {name:18s} {doc}")
    print("model families:")
    for line in supported_families():
        print(f"  {line}")
    print("offline zoo (tokenmerge.zoo.load(NAME); hf:NAME / timm:NAME: a hub id or a folder):")
    for name in CATALOG:
        print(f"  {describe(name)}")
    return 0


def _diagnostic_args(p: argparse.ArgumentParser, budgets: str, batch_size: int, stem: str) -> None:
    """The options shared by the one-model vision diagnostics (bench-compile, bench-profile)."""
    p.add_argument("--model", default="dinov2-s", help="zoo name, timm:NAME or hf:NAME")
    p.add_argument("--backend", default="hf", choices=["hf", "timm"])
    p.add_argument("--method", default="tome", help="a registered block method (default: tome)")
    p.add_argument(
        "--budgets", default=budgets, help=f"comma-separated budgets (default: {budgets})"
    )
    p.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"batch size (default: {batch_size})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results", help="output folder")
    p.add_argument("--name", help=f"file stem (default: {stem}-MODEL-BACKEND)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenmerge", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="benchmark methods × budgets against the unreduced model")
    b.add_argument("--model", default="dinov2-s", help="zoo name, timm:NAME or hf:NAME")
    b.add_argument("--kind", choices=["vision", "text", "llm"], help="needed for hub names")
    b.add_argument("--backend", default="hf", choices=["hf", "timm"])
    b.add_argument("--methods", help="comma-separated registered methods (default: tome)")
    b.add_argument("--budgets", help="comma-separated budgets: 8, 16:-1, keep:0.9, flops:0.5")
    b.add_argument(
        "--budgets-for",
        action="append",
        help="METHOD=B1,B2: budgets for one method (overrides --budgets for it)",
    )
    b.add_argument("--quick", action="store_true", help="CI smoke-test size (minutes on 2 cores)")
    b.add_argument(
        "--full",
        action="store_true",
        help="vision: the published size (n=1000 per data set, ToMe r=8,12,16,20, six input "
        "sizes; about an hour on 2 cores) instead of the default quick look (about 5 minutes)",
    )
    b.add_argument("--param", action="append", help="METHOD.NAME=VALUE hyper-parameter")
    b.add_argument("--tasks", help="comma-separated subset of cosine,knn,probe,saliency,speed")
    b.add_argument(
        "--dataset",
        help="comma-separated data sets (vision: textiles, photos, fashion-mnist; default: all)",
    )
    b.add_argument(
        "--n",
        type=int,
        help="samples for the quality tasks (vision: per data set, default 96; --full 1000)",
    )
    b.add_argument("--batch-size", type=int, help="batch size")
    b.add_argument("--timing-runs", type=int, help="interleaved timing pairs (default 5)")
    b.add_argument("--saliency-images", type=int, help="vision: images for saliency (default 64)")
    b.add_argument(
        "--baselines",
        help="vision: baselines run beside the methods, downsample,random (default) or none; "
        "--budgets-for downsample=182,168 sets the input sides",
    )
    b.add_argument(
        "--autotune",
        help="vision: comma-separated measured speed-ups (e.g. 1.5,2) to autotune for on each "
        "data set's calibration images; one 'autotune' row each",
    )
    b.add_argument(
        "--autotune-methods", help="vision: methods the autotuner may choose (default: tome)"
    )
    b.add_argument(
        "--autotune-time", type=float, help="vision: seconds per autotune search (default 240)"
    )
    b.add_argument(
        "--plan", action="append", help="vision: a plan JSON from `tokenmerge tune` to measure"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="docs/results", help="output folder")
    b.add_argument("--name", help="file stem of the outputs (default: MODEL-BACKEND)")
    b.set_defaults(func=_bench)

    v = sub.add_parser("visualize", help="draw the merge groups of one image as a PNG")
    v.add_argument("image")
    v.add_argument("--method", default="tome")
    v.add_argument("--budget", default="16")
    v.add_argument("--model", default="dinov2-s")
    v.add_argument("--backend", default="hf", choices=["hf", "timm"])
    v.add_argument("--out", help="output PNG (default: IMAGE-METHOD.png)")
    v.set_defaults(func=_visualize)

    c = sub.add_parser(
        "bench-compile", help="torch.compile versus eager, unpatched and patched (vision)"
    )
    _diagnostic_args(c, budgets="8,16", batch_size=16, stem="compile")
    c.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    c.set_defaults(func=lambda a: importlib.import_module("tokenmerge.eval.compiled").cli_main(a))

    pr = sub.add_parser(
        "bench-profile", help="CPU time per operator group, unpatched and patched (vision)"
    )
    _diagnostic_args(pr, budgets="16,20", batch_size=32, stem="profile")
    pr.add_argument(
        "--dataset", default="textiles", help="textiles (default), photos or fashion-mnist"
    )
    pr.add_argument("--calls", type=int, default=3, help="profiled calls (default: 3)")
    pr.set_defaults(func=lambda a: importlib.import_module("tokenmerge.eval.profiled").cli_main(a))

    r = sub.add_parser(
        "report", help="remake a bench's Markdown (vision: and plot) from its saved JSON"
    )
    r.add_argument("json", nargs="+", help="<name>.json written by `tokenmerge bench`")
    r.set_defaults(func=_report)

    tune.add_parser(sub)

    ls = sub.add_parser("list", help="list the registered methods and model families")
    ls.set_defaults(func=_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, UnsupportedModelError) as e:
        print(f"tokenmerge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
