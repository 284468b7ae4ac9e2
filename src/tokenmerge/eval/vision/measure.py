"""Measuring the vision benchmark: every configuration on every dataset (see the package
docstring for the measures). The CLI and the report live in :mod:`.cli`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from ...api import adapter_for, state
from ...core.budget import Budget, budget_label
from ...methods.base import REGISTRY, Method, get_method
from ...tune.autotune import autotune, check_methods
from ...tune.calibration import Calibrated, calibrate
from ...tune.plan import Plan
from .. import metrics as M
from .. import report
from ..baselines import BASELINES, downsample_sizes, versus
from ..distributed import Group, machine
from ..throughput import Timing, interleave, toggle

TASKS = frozenset({"cosine", "knn", "probe", "saliency", "speed"})
#: the datasets the bench knows: simulated textile photos (3 classes, defects), crops of
#: natural photos (5 classes), Fashion-MNIST (10 classes)
DATASETS = ("textiles", "photos", "fashion-mnist")


@dataclass
class VisionBenchConfig:
    """What to run. ``n`` images of each dataset are used for every quality task."""

    model: str = "dinov2-s"
    backend: str = "hf"
    methods: Sequence[str] = ("tome",)
    budgets: Sequence[Budget] = ()
    method_budgets: dict[str, Sequence[Budget]] = field(default_factory=dict)  # overrides
    method_params: dict[str, Any] = field(default_factory=dict)
    datasets: Sequence[str] = DATASETS
    #: images per dataset; 1000 keeps the standard error of an agreement >= 0.9 at most 0.01
    n: int = 1000
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
    downsample_steps: Sequence[int] = (1, 2, 3, 4, 5, 6)
    #: measured speed-up targets for :func:`~tokenmerge.tune.autotune`, run per dataset on
    #: that dataset's calibration images (disjoint from the evaluated ones); a row each
    autotune: Sequence[float] = ()
    autotune_methods: Sequence[str] = ("tome",)
    autotune_time: float = 240.0
    #: saved plans to measure beside the methods, by label (``tokenmerge tune``'s output)
    plans: dict[str, Plan] = field(default_factory=dict)


#: untimed pairs before each row's timed ones
TIMING_WARMUP = 1

#: calibration images given to each autotune search (a quarter held out to validate its plan)
AUTOTUNE_IMAGES = 128


@dataclass
class _Pass:
    cls: torch.Tensor  # [n, C]
    heat: torch.Tensor | None  # [m, H, W]
    tokens: list[float]  # mean tokens after each layer (empty for the unreduced model)


def check_datasets(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ``ValueError`` naming the accepted datasets."""
    bad = [d for d in names if d not in DATASETS]
    if bad or not names:
        raise ValueError(f"unknown datasets {bad or list(names)}; accepted: {', '.join(DATASETS)}")
    return tuple(names)


def load_dataset(name: str, n: int, seed: int) -> tuple[list[Any], np.ndarray]:
    """``n`` seeded images of a bench dataset (:data:`DATASETS`) as PIL images, and labels."""
    from .. import data

    if name == "fashion-mnist":
        imgs, labels = data.fashion_mnist("test", n=n, seed=seed)
        return data.to_rgb_pil(imgs), np.asarray(labels)
    if name == "textiles":
        imgs, labels, _ = data.textiles(n=n, seed=seed)
        return list(imgs), np.asarray(labels)
    if name == "photos":
        imgs, labels, _ = data.natural_crops(n, seed=seed)
        return imgs, labels
    check_datasets([name])
    raise AssertionError(name)  # unreachable: check_datasets refused it


def _calibration_images(name: str, cfg: VisionBenchConfig) -> list[Any]:
    """Unlabelled images of dataset ``name`` for calibrated methods (Fashion-MNIST: the train
    split, disjoint from the evaluated test images; textiles: another seeded subsample;
    photos: crops with another seed)."""
    from .. import data

    n = max(64, min(256, cfg.n // 2))
    if name == "fashion-mnist":
        return data.to_rgb_pil(data.fashion_mnist("train", n=n, seed=cfg.seed)[0])
    if name == "photos":
        return data.natural_crops(n, seed=cfg.seed + 1)[0]
    return [im for _, im in data.photos()] + list(data.textiles(n=n, seed=cfg.seed + 1)[0])


def _batches(n: int, bs: int) -> list[slice]:
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread meanwhile: the saliency decoder's transposed convolutions round
    differently with the thread count, and a rank of a distributed run has fewer threads
    than a single process (torchrun sets ``OMP_NUM_THREADS=1``): one thread gives every run
    the same heat maps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: one batch's CLS features, saliency maps (or None) and token counts (or None: unpatched)
_Part = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class _Work:
    """The batches of every pass over one dataset's images, shared among the ranks by round
    robin over all of them (the j-th batch asked for is rank ``j mod W``'s), and gathered once
    every pass is done: a gather per pass would leave a rank idle whenever a pass's batches
    do not divide evenly (96 images in batches of 32: 2 to 1)."""

    def __init__(self, grp: Group, tick: Callable[[int], None]) -> None:
        self.grp, self.tick = grp, tick
        self.sizes: list[int] = []  # images in each batch asked for
        self.done: dict[int, _Part] = {}

    def batches(self, n: int, bs: int) -> list[tuple[int, slice, bool]]:
        """A pass's batches of ``bs`` of ``n`` images: (item, slice, whether it is ours)."""
        out = []
        for sl in _batches(n, bs):
            j = len(self.sizes)
            self.sizes.append(sl.stop - sl.start)
            out.append((j, sl, self.grp.owner(j) == self.grp.rank))
        return out

    def gather(self) -> None:
        """Every rank's batches, on every rank (the others' images then count as done)."""
        self.done = self.grp.merge(self.done)
        for j, size in enumerate(self.sizes):
            if self.grp.owner(j) != self.grp.rank:
                self.tick(size)

    def result(self, items: Sequence[int]) -> _Pass:
        """A gathered pass from its batches, in order: the numbers one process gives."""
        parts = [self.done[j] for j in items]
        cls, heats, counts = ([p[i] for p in parts if p[i] is not None] for i in range(3))
        tokens = torch.cat(counts).mean(0).tolist() if counts else []
        return _Pass(torch.cat(cls), torch.cat(heats) if heats else None, tokens)


@torch.inference_mode()
def _forward_all(
    vm,
    pixels: torch.Tensor,
    decoder,
    n_sal: int,
    bs: int,
    patched: bool,
    work: _Work,
    heat_size: tuple[int, int] | None = None,
) -> list[int]:
    """This rank's share of a pass over ``pixels`` in batches of ``bs``: CLS features,
    saliency heatmaps (at ``heat_size``, default the input's) and token counts. Returns the
    pass's items in ``work`` (:meth:`_Work.result` once gathered)."""
    items = work.batches(len(pixels), bs)
    for j, sl, mine in items:
        if not mine:
            continue
        tok = vm.tokens(pixels[sl])
        count = heat = None
        if patched:
            st = state(vm.model)
            count = torch.stack([c.float() for c in st.tokens_per_layer], 1)
        if decoder is not None and sl.start < n_sal:
            full = state(vm.model).unmerge(tok) if patched else tok
            patches = full[:, vm.num_prefix_tokens :]
            with _one_thread():
                heat = decoder(patches, out_size=heat_size)[: n_sal - sl.start]
        work.done[j] = (tok[:, 0].float(), heat, count)
        work.tick(sl.stop - sl.start)
    return [j for j, _, _ in items]


def run(
    cfg: VisionBenchConfig,
    progress: Callable[[int], None] | None = None,
    plan: Callable[[int], None] | None = None,
    phase: Callable[[str], None] | None = None,
    grp: Group | None = None,
) -> dict[str, Any]:
    """Run the benchmark on every dataset of ``cfg``.

    Returns ``{"rows": [...], "base": {dataset: {...}}, "hardest": [datasets], "ranks":
    [...]}``: the rows in dataset order, each carrying its ``dataset``; the unreduced model's
    accuracies per dataset; the datasets hardest first (:func:`hardest_first`); each rank's
    :func:`~tokenmerge.eval.distributed.machine`. ``progress(k)`` is called after every ``k``
    images (timing included), ``plan(total)`` once the number of images to run is known
    (after the model is loaded), ``phase(what)`` as each phase starts (loading, then per
    dataset quality, autotune, timing).

    Under a launcher, ``grp`` shares the work among the ranks (:mod:`..distributed`): each
    pass's batches, each autotune target and each row to time, by round robin. Every rank
    returns the whole result; only the timings and the rank that took each depend on it."""
    grp = grp or Group()
    from .. import zoo

    datasets = check_datasets(cfg.datasets)  # refused before the model loads
    unknown = set(cfg.tasks) - TASKS
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; accepted: {sorted(TASKS)}")
    if (cfg.autotune or cfg.plans) and cfg.backend != "hf":
        raise ValueError(
            "autotuned and saved plans run on the hf backend only: the bench reads timm's "
            "tokens through forward_features, which bypasses a plan's input resize"
        )
    if cfg.autotune:
        check_methods(cfg.autotune_methods)
        bad = [s for s in cfg.autotune if not s > 1.0]
        if bad:
            raise ValueError(f"autotune targets are speed-ups above 1 (e.g. 1.5, 2), got {bad}")
    torch.manual_seed(cfg.seed)
    say = phase or (lambda what: None)
    say(f"loading {cfg.model}")
    vm = zoo.load_vision(cfg.model, backend=cfg.backend)
    want_sal = "saliency" in cfg.tasks and cfg.model == "dinov2-s"
    decoder = zoo.load_saliency_decoder() if want_sal else None
    configs, ladder = _method_configs(cfg), _downsample_ladder(cfg, vm)
    if plan is not None:
        rows_per_dataset = len(configs) + len(ladder) + len(cfg.autotune) + len(cfg.plans)
        quality = cfg.n * len(datasets) * (1 + rows_per_dataset)
        # timed once: every row on the first dataset, then only the image-dependent methods
        # autotune's plans are searched per dataset, so they are timed on each
        dynamic = sum(REGISTRY[m].dynamic for m, _ in configs) + len(cfg.autotune)
        timed_rows = rows_per_dataset + (len(datasets) - 1) * dynamic
        plan(quality + ("speed" in cfg.tasks) * timed_rows * _timing_images(cfg))
    rows: list[dict[str, Any]] = []
    base: dict[str, dict[str, Any]] = {}
    shared: dict[tuple[str, str], tuple[Timing | None, int]] = {}
    for name in datasets:
        ds_rows, base[name] = _run_dataset(
            cfg, name, vm, decoder, configs, ladder, progress, shared, say, grp
        )
        versus(ds_rows, "downsample")
        versus(ds_rows, "tome")
        rows += ds_rows
    return {
        "rows": rows,
        "base": base,
        "hardest": hardest_first(rows, datasets),
        "ranks": grp.gather(machine(grp)),
    }


def difficulty(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean ``cosine_p05`` per dataset over the method rows of ``rows`` (the baselines left
    out, unless they are all there is), in the rows' order.

    Difficulty for the methods: a smaller input loses far more on Fashion-MNIST's 28-px items
    than on photos, and would otherwise name the dataset that only the baseline finds hard."""
    ranked = [r for r in rows if r["method"] not in BASELINES] or list(rows)
    seen: dict[str, list[float]] = {}
    for r in ranked:
        seen.setdefault(r["dataset"], []).append(r["cosine_p05"])
    return {d: float(np.mean(v)) for d, v in seen.items()}


def hardest_first(rows: Sequence[dict[str, Any]], datasets: Sequence[str] = ()) -> list[str]:
    """The datasets of ``rows`` by :func:`difficulty`, lowest mean cos p05 (hardest) first;
    ties keep the rows' order. Any of ``datasets`` without a ranked row follows, in order."""
    p05 = difficulty(rows)
    order = sorted(p05, key=p05.__getitem__)
    return order + [d for d in datasets if d not in p05]


def _timing_images(cfg: VisionBenchConfig) -> int:
    """Images one timed row runs: both models, warm-up and timed pairs, a batch each."""
    return 2 * (TIMING_WARMUP + cfg.timing_runs) * cfg.batch_size


def _run_dataset(
    cfg: VisionBenchConfig,
    name: str,
    vm,
    decoder,
    configs: list[tuple[str, Budget]],
    ladder: list[int],
    progress: Callable[[int], None] | None,
    shared: dict[tuple[str, str], tuple[Timing | None, int]],
    say: Callable[[str], None],
    grp: Group,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every configuration on one dataset: its rows and the unreduced model's accuracies.

    ``shared`` holds the timings (and the rank that took each) of rows whose speed does not
    depend on the images (every token count fixed by the budget: all but the dynamic
    methods), keyed by (method, budget): timed on the first dataset, reused on the others."""
    tick = progress or (lambda k: None)
    say(f"{name}: quality")
    images, labels = load_dataset(name, cfg.n, cfg.seed)
    pixels = vm.preprocess(images)
    n_sal = min(cfg.saliency_images, len(pixels)) if decoder is not None else 0
    y = torch.as_tensor(labels)

    work = _Work(grp, tick)
    heat = tuple(pixels.shape[-2:])
    base_items = _forward_all(vm, pixels, decoder, n_sal, cfg.batch_size, False, work)
    cost = adapter_for(vm.model).target(vm.model).cost  # the analytic FLOPs model
    n0 = _n_tokens(vm)

    def batch_of(x: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(cfg.batch_size) % len(x)]

    full = batch_of(pixels)

    def timed(c: _Config) -> Timing:
        """Interleaved timing on this dataset's images: the full batch unpatched, against the
        row's (patched by its toggle, or smaller images)."""
        other, switch = (c.setup, None) if c.unpatched else (full, c.setup)
        t = interleave(
            lambda: vm.tokens(full),
            lambda: vm.tokens(other),
            cfg.batch_size,
            cfg.timing_runs,
            TIMING_WARMUP,
            between=switch,
        )
        tick(_timing_images(cfg))
        return t

    runs: list[_Config] = []
    cal: list[torch.Tensor] = []  # this dataset's calibration images, loaded on first use

    def calibration_pixels() -> torch.Tensor:
        if not cal:
            cal.append(vm.preprocess(_calibration_images(name, cfg)))
        return cal[0]

    def autotune_pixels() -> torch.Tensor:
        """A seeded subsample of the calibration images: every candidate of the search runs on
        them, so more would leave the time budget no room to correct the speed."""
        px = calibration_pixels()
        g = torch.Generator().manual_seed(cfg.seed)
        return px[torch.randperm(len(px), generator=g)[:AUTOTUNE_IMAGES]]

    def measured(
        kind: str, label: str, params: dict, method: Method, plan: Plan | None = None
    ) -> _Config:
        """One patched pass over the images (resized on entry as ``plan`` says)."""
        switch = toggle(vm.model, method, plan and plan.input_scale)
        switch(True)
        try:
            items = _forward_all(vm, pixels, decoder, n_sal, cfg.batch_size, True, work, heat)
        finally:
            switch(False)
        n_in = _n_tokens(vm, plan and plan.input_size[0])
        static = not method.dynamic and kind != "autotune"  # autotune: a plan per dataset
        return _Config(kind, label, params, items, n_in, switch, static)

    for method_name, budget in configs:
        method = get_method(method_name, r=budget, **cfg.method_params.get(method_name, {}))
        if isinstance(method, Calibrated):  # DToMe: thresholds from this dataset's held-out images
            with torch.inference_mode():
                calibrate(vm.model, method, calibration_pixels(), forward=lambda m, x: vm.tokens(x))
        label = budget_label(budget)
        runs.append(measured(method_name, label, report.method_params(method, label), method))
    plans = [("plan", label, p) for label, p in cfg.plans.items()]
    found: dict[int, Plan] = {}
    for k, target in grp.mine(cfg.autotune):  # a search times the model: one rank each
        say(f"{name}: autotune {target:g}x")
        found[k] = autotune(
            vm.model,
            autotune_pixels(),
            speedup=target,
            methods=cfg.autotune_methods,
            time_budget=cfg.autotune_time,
            batch_size=cfg.batch_size,
            timing_runs=min(cfg.timing_runs, 3),
            seed=cfg.seed,
        )
    found = grp.merge(found)
    plans += [("autotune", f"{t:g}x", found[k]) for k, t in enumerate(cfg.autotune)]
    if cfg.autotune:
        say(f"{name}: quality")
    for kind, label, p in plans:
        runs.append(measured(kind, label, _plan_params(p), p.to_method(), p))
    for size in ladder:
        small = vm.preprocess(images, size=size)
        items = _forward_all(vm, small, decoder, n_sal, cfg.batch_size, False, work, heat)
        # only the timing batch is kept, not all the smaller images
        n = _n_tokens(vm, size)
        runs.append(
            _Config("downsample", f"{size}px", {"size": size}, items, n, batch_of(small), True)
        )

    work.gather()
    base = work.result(base_items)
    knn_base = M.knn_predict(base.cls, y).numpy()
    full_flops = cost.flops(n0, [n0] * cost.depth)
    for c in runs:
        c.out = work.result(c.items)
        if c.unpatched:
            c.out.tokens = [float(c.n_in)] * cost.depth
        c.flops_ratio = cost.flops(c.n_in, c.out.tokens) / full_flops
    feats = [base.cls.numpy()] + [c.out.cls.numpy() for c in runs]
    probe_preds = M.probe_predict(feats[0], labels, feats, seed=cfg.seed)
    probe_base = probe_preds[0]
    knn_ok, probe_ok = M.proportion(knn_base == labels), M.proportion(probe_base == labels)
    base_row = {
        "n": len(labels),
        "classes": int(labels.max()) + 1,
        "knn_acc": knn_ok.value,
        "knn_acc_se": knn_ok.se,
        "probe_acc": probe_ok.value,
        "probe_acc_se": probe_ok.se,
        "cosine": 1.0,
    }
    rows = []
    timings: dict[int, tuple[Timing | None, int]] = {}
    if "speed" in cfg.tasks:
        say(f"{name}: timing")
        # the rows not timed yet, shared among the ranks; each rank against its own model
        todo = [i for i, c in enumerate(runs) if not (c.static and (c.name, c.label) in shared)]
        timings = grp.merge({i: (timed(runs[i]), grp.rank) for _, i in grp.mine(todo)})
        for j, _ in enumerate(todo):
            if grp.owner(j) != grp.rank:
                tick(_timing_images(cfg))
    for i, (c, probe) in enumerate(zip(runs, probe_preds[1:], strict=True)):
        key = (c.name, c.label)
        if i in timings and c.static:
            shared[key] = timings[i]
        timing, rank = timings.get(i) or shared.get(key) or (None, 0)
        row = {
            "model": cfg.model,
            "backend": cfg.backend,
            "dataset": name,
            "n": len(labels),
            "method": c.name,
            "budget": c.label,
            "params": c.params,
            "batch_size": cfg.batch_size,
            "tokens_per_layer": [round(t, 1) for t in c.out.tokens],
            "flops_ratio": c.flops_ratio,
            "throughput_ratio": timing and timing.ratio,
            "throughput_spread": timing and timing.spread,
            "throughput_iqr": timing and timing.iqr,
            "within_noise": timing and timing.within_noise,
            "other_load": timing and timing.other_load,
            "base_items_per_s": timing and timing.base_items_per_s,
            "items_per_s": timing and timing.reduced_items_per_s,
        }
        if grp.world > 1 and timing:
            row["timing_rank"] = rank
        row |= _quality(c.out, base, labels, knn_base, probe, probe_base, cfg.seed)
        row["knn_acc_base"], row["probe_acc_base"] = base_row["knn_acc"], base_row["probe_acc"]
        rows.append(row)
    return rows, base_row


def _quality(
    p: _Pass,
    base: _Pass,
    labels: np.ndarray,
    knn_base: np.ndarray,
    probe: np.ndarray,
    probe_base: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """A configuration's quality against the unreduced model's on the same images."""
    knn = M.knn_predict(p.cls, torch.as_tensor(labels)).numpy()
    cos = M.cosine(p.cls, base.cls)
    knn_drop = M.paired_difference(knn == labels, knn_base == labels)
    probe_drop = M.paired_difference(probe == labels, probe_base == labels)
    knn_agree, probe_agree = M.proportion(knn == knn_base), M.proportion(probe == probe_base)
    out = {
        "cosine": float(cos.mean()),
        "cosine_p05": float(np.percentile(cos, 5)),
        "cosine_p05_se": M.bootstrap_se(cos, partial(np.percentile, q=5), seed=seed),
        "knn_acc": M.proportion(knn == labels).value,
        "knn_drop": -knn_drop.value,
        "knn_drop_se": knn_drop.se,
        "knn_agreement": knn_agree.value,
        "knn_agreement_se": knn_agree.se,
        "probe_acc": M.proportion(probe == labels).value,
        "probe_drop": -probe_drop.value,
        "probe_drop_se": probe_drop.se,
        "agreement": probe_agree.value,
        "agreement_se": probe_agree.se,
        "saliency_r": None,
        "saliency_iou": None,
    }
    if p.heat is not None:
        out["saliency_r"] = float(M.pearson(p.heat, base.heat).mean())
        out["saliency_iou"] = float(M.top_iou(p.heat, base.heat).mean())
    return out


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
    #: its pass's batches in the dataset's :class:`_Work`
    items: list[int]
    #: tokens entering the first block
    n_in: int
    #: patches the model on True and removes the patch on False, or a batch of
    #: downsampling's smaller images
    setup: Callable[[bool], None] | torch.Tensor | None = None
    #: every token count fixed by the budget: the speed does not depend on the images
    static: bool = False
    #: its pass and FLOPs ratio, once the ranks' batches are gathered
    out: _Pass | None = None
    flops_ratio: float = float("nan")

    @property
    def unpatched(self) -> bool:
        """Downsampling's row: every layer keeps the ``n_in`` tokens of the smaller input."""
        return isinstance(self.setup, torch.Tensor)


def _plan_params(plan: Plan) -> dict[str, Any]:
    """A plan's row parameters: what to apply, and what its search predicted."""
    return {
        "method": plan.method,
        **plan.params,
        "input_size": plan.input_size[0],
        "schedule": list(plan.schedule),
        "search_speedup": plan.speedup,
        "search_flops": round(plan.flops_ratio, 4),
        "held_out_cosine": plan.fidelity.get("cosine"),
        "held_out_cosine_p05": plan.fidelity.get("cosine_p05"),
        "search_images": plan.fidelity.get("n", 0)
        + plan.fidelity.get("calibration", {}).get("n", 0),
        "search_seconds": plan.search.get("seconds"),
    }


def _method_configs(cfg: VisionBenchConfig) -> list[tuple[str, Budget]]:
    """(method, budget) pairs: each method at its budgets, then random pruning at the shared
    budgets when it is a baseline and not already a method."""
    names = list(cfg.methods)
    if "random" in cfg.baselines and "random" not in names:
        names.append("random")
    return [(m, b) for m in names for b in cfg.method_budgets.get(m, cfg.budgets)]


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
