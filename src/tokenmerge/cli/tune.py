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
    from .checks import HUB_FORMS, OUT, positive

    t.add_argument("--model", default="dinov2-s", help=f"a vision zoo name, or {HUB_FORMS}")
    t.add_argument("--backend", default="hf", choices=["hf", "timm"], help="dinov2-s's framework")
    target = t.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--speedup",
        type=float,
        help="measured throughput target, e.g. 2 (this or --flops is required)",
    )
    target.add_argument(
        "--flops",
        type=float,
        help="analytic FLOPs ratio target, e.g. 0.5 (this or --speedup is required)",
    )
    t.add_argument(
        "--images",
        default="textiles",
        help="unlabelled images: a bench dataset (textiles, photos, fashion-mnist) or a folder",
    )
    t.add_argument("--n", type=positive, default=128, help="images to use")
    t.add_argument("--methods", default="tome", help="comma-separated registered methods")
    t.add_argument("--time-budget", type=float, default=180.0, help="seconds of search")
    t.add_argument("--batch-size", type=positive, default=32, help="images per batch")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument(
        "--out",
        default=f"{OUT}/plan.json",
        help="plan file (relative to the current folder; its folder is made)",
    )
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
    from ..tune import autotune
    from .checks import check_methods, check_model

    check_model(args.model, "vision", "tune")
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(args.out)
    print(plan.describe())
    print(f"wrote {args.out}; apply with tm.Plan.load({args.out!r}).apply(model)")
    return 0
