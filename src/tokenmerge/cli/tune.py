"""``tokenmerge tune``: autotune a zoo vision model for a speed or FLOPs target on unlabelled
images (a bench dataset or a folder of images), and write the plan as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "tune", help="search input size + per-layer schedule for a speed-up (tm.autotune)"
    )
    t.add_argument("--model", default="dinov2-s", help="zoo name, timm:NAME or hf:NAME")
    t.add_argument("--backend", default="hf", choices=["hf", "timm"])
    target = t.add_mutually_exclusive_group(required=True)
    target.add_argument("--speedup", type=float, help="measured throughput target, e.g. 2")
    target.add_argument("--flops", type=float, help="analytic FLOPs ratio target, e.g. 0.5")
    t.add_argument(
        "--images",
        default="textiles",
        help="unlabelled images: a bench dataset (textiles, photos, fashion-mnist) or a folder",
    )
    t.add_argument("--n", type=int, default=128, help="images to use (default: 128)")
    t.add_argument("--methods", default="tome", help="comma-separated methods (default: tome)")
    t.add_argument("--time-budget", type=float, default=180.0, help="seconds (default: 180)")
    t.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="plan.json", help="plan file (default: plan.json)")
    t.set_defaults(func=main)


def _images(spec: str, n: int, seed: int) -> list:
    from ..eval.vision import DATASETS, load_dataset

    if spec in DATASETS:
        return list(load_dataset(spec, n, seed + 7)[0])  # another subsample than the bench's
    folder = Path(spec)
    if not folder.is_dir():
        raise SystemExit(
            f"--images {spec!r} is neither a dataset ({', '.join(DATASETS)}) nor a folder"
        )
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if len(files) < 16:
        raise SystemExit(f"{folder} has {len(files)} images ({IMAGE_SUFFIXES}); need at least 16")
    return [Image.open(p).convert("RGB") for p in files]


def main(args: argparse.Namespace) -> int:
    from ..eval import zoo
    from ..methods import REGISTRY
    from ..tune import autotune

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {', '.join(sorted(REGISTRY))}")
    images = _images(args.images, args.n, args.seed)
    vm = zoo.load_vision(args.model, backend=args.backend)
    pixels = vm.preprocess(images)
    try:
        plan = autotune(
            vm.model,
            pixels,
            speedup=args.speedup,
            flops=args.flops,
            methods=methods,
            time_budget=args.time_budget,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(str(e)) from None
    plan.save(args.out)
    print(plan.describe())
    print(f"wrote {args.out}; apply with tm.Plan.load({args.out!r}).apply(model)")
    return 0
