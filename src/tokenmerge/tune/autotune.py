"""The autotuner: the input size and per-layer schedule with the best feature fidelity at a
speed or FLOPs target, measured on the user's images and hardware.

No training and no labels. For a vision model and a batch of unlabelled images:

1. the images are split into a calibration set and a held-out set (seeded);
2. **candidates**: every input size from the model's own down to the first one that meets the
   FLOPs target alone (pure downsampling), times every method and proportional-attention
   setting asked for, times a family of per-layer schedule *shapes*. A shape is a
   piecewise-linear weight ``w(t)`` over the depth (``t = l / (L-1)``) through three knots
   ``(w(0), w(½), w(1))``: constant (ToMe's ``r``), decreasing, increasing, late, ... The
   schedule is ``r_l = ⌊α·W_l⌉ − ⌊α·W_{l−1}⌉`` with ``W_l = Σ_{i≤l} w_i`` (rounding the
   cumulative sum spreads the fractions), clamped to what each layer can remove, and ``α``
   is bisected so that the analytic FLOPs ratio is the largest one at or below the target;
3. **score**: each candidate runs on the calibration images; its score is the mean cosine
   of the worst 10% of per-image features against the unpatched model at full size (a tail
   measure: an average hides the images a reduction breaks). Every size gets the constant
   and the increasing shape; the two best sizes get every shape while time is left;
4. **speed** (``speedup=`` targets): the FLOPs target starts at ``1/speedup``; the best
   candidate of the three best sizes and of pure downsampling is timed against the unpatched
   model (interleaved runs), and that size's FLOPs target is corrected by the measured
   shortfall (``f ← f · s_measured / s_target``) until it meets the target (at most 3
   corrections); the best candidate that met it goes on;
5. **refine**: while time is left, the winner's knots move by ±½ (coordinate search),
   re-solved at the same FLOPs target; an improvement is kept (and timed again);
6. the winner is scored on the held-out images and returned as a :class:`~.plan.Plan`.

The time budget bounds steps 3–5 beyond one candidate per size.
With a ``flops=`` target nothing is timed and the result depends only on the images and the
seed. A ``speedup=`` target depends on the timings, so on the machine and its load.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.resize import check_input_scale, patch_size, scaled_side
from ..api import adapter_for
from ..core.budget import as_float, as_int
from ..methods.base import REGISTRY, get_method
from .calibration import Forward, as_batches, default_forward
from .plan import Plan

#: the initial schedule shapes: knots (w(0), w(1/2), w(1))
SHAPES: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0),  # constant r (ToMe)
    (2.0, 1.0, 0.0),  # decreasing (ToMe's inflection -1)
    (0.0, 1.0, 2.0),  # increasing
    (0.0, 1.0, 1.0),  # late start
    (1.0, 1.0, 0.0),  # early, the last layers untouched
    (0.5, 1.5, 1.0),  # middle-heavy
)
Features = Callable[[Any], Tensor]


# ---------------------------------------------------------------------------------- schedules
def shape_weights(knots: Sequence[float], depth: int) -> list[float]:
    """``w_l`` at each of ``depth`` layers, linear between the knots at t = 0, ½, 1."""
    a, b, c = knots
    out = []
    for layer in range(depth):
        t = layer / max(depth - 1, 1)
        out.append(a + (b - a) * 2 * t if t <= 0.5 else b + (c - b) * (2 * t - 1))
    return out


def scaled_schedule(
    weights: Sequence[float], alpha: float, n0: int, n_protected: int, max_r: Callable
) -> list[int]:
    """``r_l = round(α·W_l) − round(α·W_{l−1})`` (``W`` the cumulative weights), each clamped to
    what layer ``l`` can remove."""
    out, n, done, cum = [], n0, 0, 0.0
    for w in weights:
        cum += w
        r = max(0, min(round(alpha * cum) - done, max_r(n, n_protected)))
        out.append(r)
        done += r
        n -= r
    return out


# ---------------------------------------------------------------------------------- model I/O
def default_features(output: Any) -> Tensor:
    """The feature compared: the first token (CLS) of ``last_hidden_state``, else the logits,
    else the output tensor itself (its first token if it has one)."""
    for key in ("last_hidden_state", "logits"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            output = value
            break
    if not isinstance(output, Tensor):
        raise TypeError(
            f"autotune cannot read features from a {type(output).__name__}: pass "
            "features=lambda out: ... returning a [B, C] tensor"
        )
    return output[:, 0] if output.dim() == 3 else output.flatten(1)


def tail_score(cos: Tensor, fraction: float = 0.1) -> float:
    """Mean of the lowest ``fraction`` of the per-image cosines (at least one image)."""
    k = max(1, math.ceil(fraction * cos.numel()))
    return float(cos.sort().values[:k].mean())


@dataclass(frozen=True)
class _Candidate:
    method: str
    prop_attn: bool | None
    size: tuple[int, int]
    knots: tuple[float, float, float]
    flops_target: float
    schedule: tuple[int, ...] = ()
    flops: float = 1.0
    score: float = -math.inf
    cosine: float = 0.0
    speedup: float | None = None

    def plan(self, native: tuple[int, int], params: dict[str, Any]) -> Plan:
        p = dict(params.get(self.method, {}))
        if self.prop_attn is not None:
            p["prop_attn"] = self.prop_attn
        return Plan(self.method, p, self.schedule, native, self.size, self.flops, self.speedup)

    def row(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "prop_attn": self.prop_attn,
            "input_size": list(self.size),
            "knots": list(self.knots),
            "schedule": list(self.schedule),
            "flops_ratio": round(self.flops, 4),
            "score": round(self.score, 5),
            "cosine": round(self.cosine, 5),
            "speedup": None if self.speedup is None else round(self.speedup, 3),
        }


class _Search:
    """The state of one autotune run (model, data, reference features, clock, progress)."""

    def __init__(self, model, calib, forward, features, batch_size, params, time_budget, bar):
        self.model, self.calib, self.forward, self.features = model, calib, forward, features
        self.batch_size, self.params = batch_size, params
        self.target = adapter_for(model).target(model)
        self.cost = self.target.cost
        self.patch = patch_size(self.target)
        self.native = (int(calib.shape[-2]), int(calib.shape[-1]))
        self.n_native = self.n0(self.native)
        self.full_flops = self.cost.flops(self.n_native, [self.n_native] * self.cost.depth)
        self.t0, self.budget, self.bar = time.monotonic(), time_budget, bar
        self.evaluated: list[_Candidate] = []  # scored
        self.scores: dict[tuple, _Candidate] = {}  # by (method, prop_attn, size, schedule)
        self.timings: list[_Candidate] = []  # timed
        self.ref = self.run_features(None, calib)

    # -- clock and progress
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def time_left(self) -> bool:
        return self.elapsed() < self.budget

    def tick(self, best: _Candidate | None = None) -> None:
        if self.bar is not None:
            self.bar.n = min(round(self.elapsed(), 1), self.budget)
            if best is not None:
                self.bar.set_postfix_str(
                    f"last {best.method} {best.size[0]}px tail cos {best.score:.4f}"
                    + (f" {best.speedup:.2f}x" if best.speedup else "")
                )
            self.bar.refresh()

    # -- geometry and FLOPs
    def n0(self, size: tuple[int, int]) -> int:
        return (size[0] // self.patch) * (size[1] // self.patch) + self.target.n_prefix

    def size_at(self, k: int) -> tuple[int, int]:
        """``k`` patches fewer on the height (the width scaled alike)."""
        h, w = self.native
        scale = (h - k * self.patch) / h
        return (scaled_side(h, scale, self.patch), scaled_side(w, scale, self.patch))

    def flops(self, size: tuple[int, int], schedule: Sequence[int]) -> float:
        n0 = self.n0(size)
        return self.cost.flops(n0, self.cost.tokens(n0, schedule)) / self.full_flops

    def solve(self, c: _Candidate) -> _Candidate:
        """``c`` with the schedule whose FLOPs ratio is the largest at or below its target."""
        n0, p = self.n0(c.size), self.target.n_prefix
        method = get_method(c.method)
        weights = shape_weights(c.knots, self.cost.depth)

        def sched(alpha: float) -> list[int]:
            return scaled_schedule(weights, alpha, n0, p, method.max_r)

        lo, hi = 0.0, float(n0)
        if self.flops(c.size, sched(lo)) <= c.flops_target:
            return replace(c, schedule=tuple(sched(lo)), flops=self.flops(c.size, sched(lo)))
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.flops(c.size, sched(mid)) <= c.flops_target:
                hi = mid
            else:
                lo = mid
        s = sched(hi)
        return replace(c, schedule=tuple(s), flops=self.flops(c.size, s))

    # -- measuring
    @torch.inference_mode()
    def run_features(self, plan: Plan | None, images: Tensor) -> Tensor:
        with nullcontext() if plan is None else plan.patched(self.model):
            batches = as_batches(images, self.batch_size)
            return torch.cat([self.features(self.forward(self.model, x)).float() for x in batches])

    def fidelity(self, plan: Plan, images: Tensor, ref: Tensor) -> Tensor:
        return torch.nn.functional.cosine_similarity(self.run_features(plan, images), ref, dim=-1)

    def score(self, c: _Candidate) -> _Candidate:
        key = (c.method, c.prop_attn, c.size, c.schedule)
        seen = self.scores.get(key)
        if seen is not None:  # the same schedule from another shape or pass: no second run
            return replace(c, score=seen.score, cosine=seen.cosine)
        cos = self.fidelity(c.plan(self.native, self.params), self.calib, self.ref)
        out = self.scores[key] = replace(c, score=tail_score(cos), cosine=float(cos.mean()))
        self.evaluated.append(out)
        self.tick(out)
        return out

    def timed(self, c: _Candidate, runs: int) -> _Candidate:
        from ..eval.throughput import interleave, toggle

        plan = c.plan(self.native, self.params)
        batch = self.calib[torch.arange(self.batch_size) % len(self.calib)]

        def step() -> None:
            self.forward(self.model, batch)

        switch = toggle(self.model, plan.to_method(), plan.input_scale)
        t = interleave(step, step, self.batch_size, runs, warmup=1, between=switch)
        out = replace(c, speedup=t.ratio)
        self.timings.append(out)
        self.tick(out)
        return out


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` as a list, or ``ValueError`` naming the methods the search accepts."""
    ok = sorted(
        n
        for n, c in REGISTRY.items()
        if c.site == "block" and not c.dynamic and c.exact_counts and n != "random"
    )
    names = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in names if m not in ok]
    if bad or not names:
        raise ValueError(
            f"autotune searches methods with a fixed per-layer schedule; got {bad or names}, "
            f"accepted: {', '.join(ok)}"
        )
    return names


def autotune(
    model: nn.Module,
    images: Tensor,
    *,
    speedup: float | None = None,
    flops: float | None = None,
    methods: Sequence[str] = ("tome",),
    prop_attn: Sequence[bool | None] = (None,),
    params: dict[str, dict[str, Any]] | None = None,
    max_downsample: int | None = None,
    holdout: float = 0.25,
    time_budget: float = 180.0,
    batch_size: int = 32,
    timing_runs: int = 3,
    seed: int = 0,
    forward: Forward | None = None,
    features: Features | None = None,
    progress: bool = True,
) -> Plan:
    """Search the input size and per-layer schedule with the best fidelity at a target.

    Args:
        model: a vision model a tokenmerge adapter supports, unpatched (timm models need
            ``dynamic_img_size=True`` for the input-size search).
        images: unlabelled, preprocessed images ``[N, 3, H, W]`` at the model's input size
            (N ≥ 16; a few hundred give a steadier tail score).
        speedup: measured throughput target against the unpatched model (e.g. ``2.0``), at
            ``batch_size``, on this machine.
        flops: analytic FLOPs target instead, as a ratio (e.g. ``0.5``); nothing is timed.
        methods: registered block-site methods with a fixed schedule to try.
        prop_attn: proportional-attention settings to try (``None``: the family default).
        params: other hyper-parameters per method, e.g. ``{"pitome": {"margin": 0.9}}``.
        max_downsample: most patches per side to remove from the input (default: until
            downsampling alone meets the target; 0 keeps the input size).
        holdout: fraction of ``images`` held out to validate the winner (at least 8).
        time_budget: seconds; the search stops refining once they are spent (the first
            candidate per input size and the final validation always run).
        timing_runs: interleaved timed pairs per speed measurement.
        forward: ``forward(model, pixels)`` (default: ``model(pixels)``, which the plan's
            resize hook and transformers' and timm's vision models all take).
        features: the ``[B, C]`` features compared, from the model's output (default: the
            CLS token of ``last_hidden_state``, else the logits).
        progress: a progress bar over the time budget on stderr.

    Returns:
        The :class:`~.plan.Plan`; ``plan.apply(model)`` patches the model with it.
    """
    if (speedup is None) == (flops is None):
        raise ValueError("give exactly one target: speedup=2.0 (measured) or flops=0.5")
    if speedup is not None:
        speedup = as_float(speedup, "speedup", lo=1.0, lo_open=True, hint=" (e.g. 2.0)")
    else:
        flops = as_float(flops, "flops", lo=0.0, hi=1.0, lo_open=True, hint=" (e.g. 0.5)")
    names = check_methods(methods)
    props = list(prop_attn)
    for p in props:
        if p is not None and not isinstance(p, bool):
            raise TypeError(f"prop_attn values must be True, False or None, got {p!r}")
    holdout = as_float(holdout, "holdout", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    timing_runs = as_int(timing_runs, "timing_runs", minimum=1)
    time_budget = as_float(time_budget, "time_budget", lo=0.0, lo_open=True)
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"images must be preprocessed pixels [N, C, H, W], got {got}")
    n_hold = max(8, round(holdout * len(images)))
    if len(images) - n_hold < 8:
        raise ValueError(f"autotune needs at least 16 images, got {len(images)}")
    if getattr(model, "_tokenmerge_patch", None) is not None:
        raise ValueError("the model is already patched: call tm.remove(model) first")
    target = adapter_for(model).target(model)  # an unsupported model is refused here
    if target.grid_from is None:
        raise ValueError(
            f"autotune searches input sizes and schedules of vision models; the "
            f"{target.family} adapter has no patch embedding"
        )
    if max_downsample != 0:
        check_input_scale(model, target, 0.5)  # timm without dynamic_img_size: say so now
    params = {k: dict(v) for k, v in (params or {}).items()}
    for m in names:
        get_method(m, **params.get(m, {}))  # bad hyper-parameters fail now

    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    calib, held = images[perm[n_hold:]], images[perm[:n_hold]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=time_budget, desc="autotune", unit="s", file=sys.stderr)
        bar.bar_format = "{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}"
    try:
        s = _Search(model, calib, forward or default_forward, features or default_features,
                    batch_size, params, time_budget, bar)  # fmt: skip
        best = _run(s, names, props, speedup, flops, max_downsample, timing_runs)
        ref_held = s.run_features(None, held)
        cos_held = s.fidelity(best.plan(s.native, params), held, ref_held)
    finally:
        if bar is not None:
            bar.close()
    ranked = sorted(s.evaluated, key=lambda c: -c.score)
    plan = best.plan(s.native, params)
    return replace(
        plan,
        fidelity={
            "cosine": float(cos_held.mean()),
            "cosine_p05": float(torch.quantile(cos_held, 0.05)),
            "tail_cosine": tail_score(cos_held),
            "n": len(held),
            "calibration": {"cosine": best.cosine, "tail_cosine": best.score, "n": len(calib)},
        },
        search={
            "target": {"speedup": speedup} if speedup is not None else {"flops": flops},
            "seconds": round(s.elapsed(), 1),
            "candidates": len(s.evaluated),
            "seed": seed,
            "best": [c.row() for c in ranked[:8]],
            "timed": [c.row() for c in s.timings],
        },
    )


def _run(s: _Search, names, props, speedup, flops, max_down, runs) -> _Candidate:
    """The search proper (steps 2–5 of the module docstring); returns the winner."""
    f0 = flops if flops is not None else 1.0 / speedup
    limit = s.native[0] // s.patch - 1 if max_down is None else max_down
    sizes = []
    for k in range(limit + 1):
        size = s.size_at(k)
        sizes.append(size)
        if s.flops(size, [0] * s.cost.depth) <= f0:
            break  # downsampling alone meets the target: smaller inputs only lose
    structures = [(m, p) for m in names for p in props]

    def best_at(size, target, knots_list) -> _Candidate:
        cands = [
            s.score(s.solve(_Candidate(m, p, size, k, target)))
            for m, p in structures
            for k in knots_list
            if k == knots_list[0] or s.time_left()
        ]
        return max(cands, key=lambda c: c.score)

    # coarse: two contrasting shapes at every size (always run), the rest where it looks best
    per_size = {size: best_at(size, f0, SHAPES[:3:2]) for size in sizes}
    for size in sorted(sizes, key=lambda z: -per_size[z].score)[:2]:
        if s.time_left():
            per_size[size] = max(per_size[size], best_at(size, f0, SHAPES), key=_score)
    if speedup is not None:
        ranked = sorted(sizes, key=lambda z: -per_size[z].score)
        for size in dict.fromkeys([*ranked[:3], sizes[-1]]):  # + pure downsampling
            c = s.timed(per_size[size], runs)
            for _ in range(3):
                if c.speedup >= speedup or not s.time_left():
                    break
                target = c.flops_target * c.speedup / speedup
                c = s.timed(best_at(size, target, (c.knots,)), runs)
            per_size[size] = c
        timed = [c for c in per_size.values() if c.speedup is not None]
        pool = [c for c in timed if c.speedup >= speedup] or [max(timed, key=_speed)]
    else:
        pool = list(per_size.values())
    chosen = max(pool, key=_score)
    best = _refine(s, chosen)
    if speedup is not None and best is not chosen:
        best = s.timed(best, runs)
        if best.speedup < speedup <= chosen.speedup:
            return chosen  # the refined schedule lost the speed: keep the measured winner
    return best


def _score(c: _Candidate) -> float:
    return c.score


def _speed(c: _Candidate) -> float:
    return c.speedup or 0.0


def _refine(s: _Search, best: _Candidate) -> _Candidate:
    """Coordinate search on the knots of ``best`` (±½, weights ≥ 0) while time is left."""
    tried = {best.knots}
    improved = True
    while improved and s.time_left():
        improved = False
        for i in range(3):
            for step in (0.5, -0.5):
                knots = list(best.knots)
                knots[i] = max(0.0, knots[i] + step)
                k = tuple(knots)
                if k in tried or not any(k) or not s.time_left():
                    continue
                tried.add(k)
                c = s.score(s.solve(replace(best, knots=k, speedup=None)))
                if c.score > best.score:
                    best, improved = c, True
    return best
