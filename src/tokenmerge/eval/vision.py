"""The vision benchmark: every method and budget against the unreduced model, in one process.

For each configuration the same images go through the unpatched model and the patched one:

- CLS-feature cosine (mean and 5th percentile);
- leave-one-out k-NN accuracy (k = 20, cosine; bank and queries from the model under test);
- a cross-fitted linear probe trained on the *unreduced* features;
- decision agreement of k-NN and probe with the unreduced model, with standard errors;
- saliency agreement: the real dense head is fed tokens unmerged back onto the patch grid
  (Pearson r and IoU of the top 10% pixels against the unreduced heatmap);
- measured throughput ratio against the unpatched model (interleaved runs, median);
- analytic FLOPs ratio and the tokens reached at each layer.

The baselines of :mod:`.baselines` run beside the methods: downsampling (the same images
fitted to smaller sides, a ladder of input sizes) and random pruning (at the methods' budgets);
each method's quality is set against downsampling's at the speed the method reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api import adapter_for, patched, state
from ..core.budget import Budget, budget_label
from ..methods.base import Method, get_method
from . import metrics as M
from . import report
from .baselines import (
    BASELINES,
    MATCHED,
    downsample_sizes,
    parse_baselines,
    versus_downsampling,
)
from .throughput import Timing, interleave, toggle

QUICK = {"n": 96, "budgets": "8,16", "timing_runs": 3, "saliency_images": 16, "batch_size": 16}
TASKS = frozenset({"cosine", "knn", "probe", "saliency", "speed"})


@dataclass
class VisionBenchConfig:
    """What to run. ``n`` images are used for every quality task."""

    model: str = "dinov2-s"
    backend: str = "hf"
    methods: Sequence[str] = ("tome",)
    budgets: Sequence[Budget] = ()
    method_budgets: dict[str, Sequence[Budget]] = field(default_factory=dict)  # overrides
    method_params: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    n: int = 500
    batch_size: int = 32
    timing_runs: int = 5
    saliency_images: int = 64
    seed: int = 0
    tasks: frozenset[str] = TASKS
    #: baselines run beside the methods (:mod:`.baselines`)
    baselines: Sequence[str] = BASELINES
    #: downsampling's input sides in pixels (default: ``downsample_steps`` patches fewer per
    #: side than the model's input)
    downsample: Sequence[int] | None = None
    downsample_steps: Sequence[int] = (2, 3, 4, 5, 6)


@dataclass
class _Pass:
    cls: torch.Tensor  # [n, C]
    heat: torch.Tensor | None  # [m, H, W]
    tokens: list[float]  # mean tokens after each layer (empty for the unreduced model)


def _load_data(name: str, n: int, seed: int) -> tuple[list[Any], np.ndarray]:
    from . import data

    if name == "fashion-mnist":
        imgs, labels = data.fashion_mnist("test", n=n, seed=seed)
        return data.to_rgb_pil(imgs), np.asarray(labels)
    if name == "textiles":
        imgs, labels, _ = data.textiles(n=n, seed=seed)
        return list(imgs), np.asarray(labels)
    raise ValueError(f"unknown dataset {name!r}; accepted: fashion-mnist, textiles")


def _calibration_images(cfg: VisionBenchConfig) -> list[Any]:
    """Unlabelled images for calibrated methods (Fashion-MNIST: the train split, disjoint from
    the evaluated test images; textiles: another seeded subsample)."""
    from . import data

    n = max(64, min(256, cfg.n // 2))
    if cfg.dataset == "fashion-mnist":
        return data.to_rgb_pil(data.fashion_mnist("train", n=n, seed=cfg.seed)[0])
    return [im for _, im in data.photos()] + list(data.textiles(n=n, seed=cfg.seed + 1)[0])


def _batches(n: int, bs: int) -> list[slice]:
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


@torch.inference_mode()
def _forward_all(
    vm,
    pixels: torch.Tensor,
    decoder,
    n_sal: int,
    bs: int,
    patched: bool,
    tick: Callable,
    heat_size: tuple[int, int] | None = None,
) -> _Pass:
    """CLS features, saliency heatmaps (at ``heat_size``, default the input's) and mean token
    counts of ``pixels``, in batches of ``bs``."""
    cls, heats, counts = [], [], []
    for sl in _batches(len(pixels), bs):
        tok = vm.tokens(pixels[sl])
        cls.append(tok[:, 0].float())
        if patched:
            st = state(vm.model)
            counts.append(torch.stack([c.float() for c in st.tokens_per_layer], 1))
        if decoder is not None and sl.start < n_sal:
            full = state(vm.model).unmerge(tok) if patched else tok
            patches = full[:, vm.num_prefix_tokens :]
            heats.append(decoder(patches, out_size=heat_size)[: n_sal - sl.start])
        tick(sl.stop - sl.start)
    tokens = torch.cat(counts).mean(0).tolist() if counts else []
    return _Pass(torch.cat(cls), torch.cat(heats) if heats else None, tokens)


def run(
    cfg: VisionBenchConfig,
    progress: Callable[[int], None] | None = None,
    plan: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], "base": {...}}``. ``progress(k)`` is
    called after every ``k`` images, ``plan(total)`` once the number of images to run is
    known (after the model is loaded)."""
    from . import zoo

    tick = progress or (lambda k: None)
    torch.manual_seed(cfg.seed)
    vm = zoo.load_vision(cfg.model, backend=cfg.backend)
    unknown = set(cfg.tasks) - TASKS
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; accepted: {sorted(TASKS)}")
    want_sal = "saliency" in cfg.tasks and cfg.model == "dinov2-s"
    decoder = zoo.load_saliency_decoder() if want_sal else None
    images, labels = _load_data(cfg.dataset, cfg.n, cfg.seed)
    pixels = vm.preprocess(images)
    n_sal = min(cfg.saliency_images, len(pixels)) if decoder is not None else 0
    y = torch.as_tensor(labels)
    configs, ladder = _method_configs(cfg), _downsample_ladder(cfg, vm)
    if plan is not None:
        plan(len(pixels) * (1 + len(configs) + len(ladder)))

    base = _forward_all(vm, pixels, decoder, n_sal, cfg.batch_size, False, tick)
    knn_base = M.knn_predict(base.cls, y).numpy()
    cost = adapter_for(vm.model).target(vm.model).cost  # the analytic FLOPs model
    n0 = _n_tokens(vm)

    def batch_of(x: torch.Tensor, bs: int) -> torch.Tensor:
        return x[torch.arange(bs) % len(x)]

    full = batch_of(pixels, cfg.batch_size)

    def timed(other: torch.Tensor, toggle: Callable[[bool], None] | None = None) -> Timing | None:
        """Interleaved timing: the full batch unpatched, against ``other`` (patched by
        ``toggle``, or smaller images)."""
        if "speed" not in cfg.tasks:
            return None
        return interleave(
            lambda: vm.tokens(full),
            lambda: vm.tokens(other),
            cfg.batch_size,
            cfg.timing_runs,
            between=toggle,
        )

    runs: list[_Config] = []
    cal_pixels = None
    for name, budget in configs:
        method = get_method(name, r=budget, **cfg.method_params.get(name, {}))
        if hasattr(method, "calibrate"):  # DToMe: thresholds from held-out unlabelled images
            if cal_pixels is None:
                cal_pixels = vm.preprocess(_calibration_images(cfg))
            with torch.inference_mode():
                method.calibrate(vm.model, cal_pixels, forward=lambda m, x: vm.tokens(x))
        with patched(vm.model, method):
            p = _forward_all(vm, pixels, decoder, n_sal, cfg.batch_size, True, tick)
        label = budget_label(budget)
        params = report.method_params(method, label)
        runs.append(_Config(name, label, params, p, cost.ratio(n0, p.tokens), method))
    for size in ladder:
        small = vm.preprocess(images, size=size)
        p = _forward_all(vm, small, decoder, n_sal, cfg.batch_size, False, tick, pixels.shape[-2:])
        n = _n_tokens(vm, size)
        p.tokens = [float(n)] * cost.depth
        flops = cost.flops(n, p.tokens) / cost.flops(n0, [n0] * cost.depth)
        runs.append(_Config("downsample", f"{size}px", {"size": size}, p, flops, small))

    feats = [base.cls.numpy()] + [c.out.cls.numpy() for c in runs]
    probe_preds = M.probe_predict(feats[0], labels, feats, seed=cfg.seed)
    probe_base = probe_preds[0]
    base_row = {
        "knn_acc": M.proportion(knn_base == labels).value,
        "probe_acc": M.proportion(probe_base == labels).value,
        "cosine": 1.0,
    }

    rows = []
    for c, probe in zip(runs, probe_preds[1:], strict=True):
        p = c.out
        knn = M.knn_predict(p.cls, y).numpy()
        cos = M.cosine(p.cls, base.cls)
        if isinstance(c.setup, torch.Tensor):  # downsampling: the smaller images
            timing = timed(batch_of(c.setup, cfg.batch_size))
        else:
            timing = timed(full, toggle(vm.model, c.setup))
        row = {
            "model": cfg.model,
            "backend": cfg.backend,
            "dataset": cfg.dataset,
            "n": len(labels),
            "method": c.name,
            "budget": c.label,
            "params": c.params,
            "batch_size": cfg.batch_size,
            "tokens_per_layer": [round(t, 1) for t in p.tokens],
            "flops_ratio": c.flops_ratio,
            "throughput_ratio": timing and timing.ratio,
            "base_items_per_s": timing and timing.base_items_per_s,
            "items_per_s": timing and timing.reduced_items_per_s,
            "cosine": float(cos.mean()),
            "cosine_p05": float(np.percentile(cos, 5)),
            "knn_acc": M.proportion(knn == labels).value,
            "knn_acc_base": base_row["knn_acc"],
            "knn_drop": -M.paired_difference(knn == labels, knn_base == labels).value,
            "knn_drop_se": M.paired_difference(knn == labels, knn_base == labels).se,
            "knn_agreement": M.proportion(knn == knn_base).value,
            "knn_agreement_se": M.proportion(knn == knn_base).se,
            "probe_acc": M.proportion(probe == labels).value,
            "probe_acc_base": base_row["probe_acc"],
            "probe_drop": -M.paired_difference(probe == labels, probe_base == labels).value,
            "probe_drop_se": M.paired_difference(probe == labels, probe_base == labels).se,
            "agreement": M.proportion(probe == probe_base).value,
            "agreement_se": M.proportion(probe == probe_base).se,
            "saliency_r": None,
            "saliency_iou": None,
        }
        if p.heat is not None:
            row["saliency_r"] = float(M.pearson(p.heat, base.heat).mean())
            row["saliency_iou"] = float(M.top_iou(p.heat, base.heat).mean())
        rows.append(row)
    versus_downsampling(rows)
    return {"rows": rows, "base": base_row}


def _n_tokens(vm, size: int | None = None) -> int:
    """Tokens entering the first block for ``size`` px inputs (default: the model's size)."""
    grid = vm.grid if size is None else size // vm.patch_size
    return grid * grid + vm.num_prefix_tokens


@dataclass
class _Config:
    """One row to measure: a method at a budget, or a baseline."""

    name: str
    label: str  # the budget column
    params: dict[str, Any]
    out: _Pass
    flops_ratio: float
    setup: Method | torch.Tensor  # the method to patch, or downsampling's smaller images


def _method_configs(cfg: VisionBenchConfig) -> list[tuple[str, Budget]]:
    """(method, budget) pairs: each method at its budgets, then random pruning at the shared
    budgets when it is a baseline and not already a method."""
    names = list(cfg.methods)
    if "random" in cfg.baselines and "random" not in names:
        names.append("random")
    return [(m, b) for m in names for b in cfg.method_budgets.get(m, cfg.budgets)]


def _sizes(budgets: Sequence[Budget]) -> list[int] | None:
    """``--budgets-for downsample=182,168``: input sides in pixels."""
    from ..core.budget import Constant

    if any(not isinstance(b, Constant) for b in budgets):
        raise SystemExit("downsampling budgets are input sides in pixels, e.g. downsample=182,168")
    return [b.r for b in budgets] or None


def _downsample_ladder(cfg: VisionBenchConfig, vm) -> list[int]:
    if "downsample" not in cfg.baselines:
        return []
    if vm.patch_size is None:
        raise ValueError(f"{cfg.model} has no known patch size: run it with baselines=()")
    sizes = cfg.downsample or downsample_sizes(vm.image_size, vm.patch_size, cfg.downsample_steps)
    too_big = [s for s in sizes if not vm.patch_size <= s < vm.image_size]
    if too_big:
        raise ValueError(
            f"downsampling sizes must lie in [{vm.patch_size}, {vm.image_size}) px, got {too_big}"
        )
    return list(sizes)


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for vision models (called by the CLI)."""
    from tqdm import tqdm

    from ..cli.main import parse_method_budgets, parse_params
    from ..core.budget import parse_budget
    from ..methods import REGISTRY
    from . import report

    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    methods = [m.strip() for m in (args.methods or "tome").split(",")]
    for m in methods:
        if m not in REGISTRY:
            raise SystemExit(f"unknown method {m!r}; registered: {', '.join(sorted(REGISTRY))}")
    budgets = [parse_budget(b) for b in (args.budgets or "4,8,12,16,20").split(",")]
    try:
        baselines = parse_baselines(args.baselines)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    per_method = parse_method_budgets(args.budgets_for or [], accepted=[*methods, *baselines])
    tasks = frozenset(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    cfg = VisionBenchConfig(
        model=args.model,
        backend=args.backend,
        methods=methods,
        budgets=budgets,
        method_budgets=per_method,
        method_params=parse_params(args.param or []),
        dataset=args.dataset or "fashion-mnist",
        n=args.n or 500,
        batch_size=args.batch_size or 32,
        timing_runs=args.timing_runs or 5,
        saliency_images=args.saliency_images or 64,
        seed=args.seed,
        tasks=tasks,
        baselines=baselines,
        downsample=_sizes(per_method.pop("downsample", [])),
        downsample_steps=(2, 4) if args.quick else VisionBenchConfig.downsample_steps,
    )

    with tqdm(desc="bench", unit="img", file=sys.stderr) as bar:

        def plan(total: int) -> None:
            bar.total = total
            bar.refresh()

        result = run(cfg, bar.update, plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{cfg.model.replace(':', '_').replace('/', '_')}-{cfg.backend}"
    meta = report.provenance(cfg.seed)
    meta["config"] = {
        "dataset": cfg.dataset,
        "n": cfg.n,
        "batch_size": cfg.batch_size,
        "timing_runs": cfg.timing_runs,
        "tasks": sorted(cfg.tasks),
    }
    meta["base"] = result["base"]
    rows = result["rows"]
    report.write_json(out / f"{stem}.json", meta, rows)
    cols = [
        ("method", "method"),
        ("budget", "budget"),
        ("throughput_ratio", "speed-up"),
        ("flops_ratio", "FLOPs"),
        ("cosine", "cos"),
        ("cosine_p05", "cos p05"),
        (("knn_drop", "knn_drop_se"), "k-NN drop"),
        (("knn_agreement", "knn_agreement_se"), "k-NN agree"),
        (("probe_drop", "probe_drop_se"), "probe drop"),
        (("agreement", "agreement_se"), "probe agree"),
        ("saliency_r", "saliency r"),
        ("saliency_iou", "top-10% IoU"),
        *((f"vs_downsample_{key}", f"{name} vs downsampling") for key, name in MATCHED),
        ("tokens_per_layer", "tokens after each layer"),
    ]
    b = result["base"]
    notes = (
        f"{cfg.model} ({cfg.backend}), {cfg.dataset}, n={cfg.n}, batch {cfg.batch_size}. "
        f"Unreduced: k-NN {b['knn_acc']:.3f}, probe {b['probe_acc']:.3f}. Speed-up is the "
        "median of interleaved runs against the unpatched model with its fused attention.\n"
    )
    if "downsample" in cfg.baselines:
        notes += (
            "\nBaselines: *downsample* fits the same images to a smaller side (the budget, in "
            "pixels) and runs the unpatched model with its position table interpolated; "
            "*random* prunes random tokens at the methods' budgets. The two *vs downsampling* "
            "columns are a row's cos p05 and probe agreement minus downsampling's at the same "
            "measured speed-up (linear interpolation between the two nearest input sizes; "
            "empty outside the measured range): > 0 means the method beats a smaller input.\n"
        )
    (out / f"{stem}.md").write_text(
        report.markdown(rows, cols, meta, f"tokenmerge bench: {cfg.model}", notes)
    )
    if "speed" in cfg.tasks:
        report.pareto_plot(
            rows,
            out / f"{stem}.png",
            [
                ("probe_acc", "linear-probe accuracy"),
                ("knn_acc", "k-NN accuracy"),
                ("cosine_p05", "CLS cosine, 5th percentile"),
            ],
            f"{cfg.model} on {cfg.dataset} (n={cfg.n}, CPU, batch {cfg.batch_size})",
            base={"probe_acc": b["probe_acc"], "knn_acc": b["knn_acc"], "cosine_p05": 1.0},
        )
    print(f"wrote {out / stem}.json, .md" + (", .png" if "speed" in cfg.tasks else ""))
    return 0
