"""The VLM bench: visual-token reduction on ``tiny-llava``, against the unreduced model.

**Data.** Held-out synthetic scenes (:mod:`.scenes`, split ``test``) and a fixed, seeded list
of questions balanced over the question types (colour, shape, count, position, class): the
first ``n / 5`` questions of each type in scene order, from :func:`.scenes.questions`. The
list is written to the result.

**Methods and budgets.** Every projector method (the random and downsampling baselines
included) and every decoder method on the image tokens (FastV and HoliTom's inner merge at
their paper default K = 2, AIM's progressive pruning with its default schedule). A budget is a
number of visual tokens kept per image (LLaVA's 576 -> 192 / 128 / 64 scaled to 256: 85, 57,
28, plus an extreme 16), i.e. ``ratio = 1 - keep / 256``; decoder methods remove the same
fraction from layer K on (they run the first K layers on every token).

**Measured** (:mod:`.measure`): answers by greedy ``generate`` in left-padded batches, compared
by first word with the gold answer; visual tokens, KV bytes and the analytic FLOPs of the
prefill read from the runtime's state; TTFT and decode speed timed interleaved with the
unpatched model on one question.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...methods import REGISTRY
from ...methods.decoder import DECODER_METHODS
from ...methods.projector import PROJECTOR_METHODS
from .prompt import N_IMAGE_TOKENS
from .scenes import KINDS

#: LLaVA-1.5's 576 visual tokens -> 192 / 128 / 64 (VisionZip's budgets), scaled to 256; and 16
KEEPS: tuple[int, ...] = (85, 57, 28, 16)
#: every method the bench runs by default, in report order
METHODS: tuple[str, ...] = (*PROJECTOR_METHODS, *DECODER_METHODS)
#: the tasks ``--tasks`` may choose
TASKS = frozenset({"accuracy", "speed"})


@dataclass
class VLMBenchConfig:
    """One run of the VLM bench."""

    model: str = "tiny-llava"
    methods: tuple[str, ...] = METHODS
    keeps: tuple[int, ...] = KEEPS
    n: int = 100  # questions, balanced over the question types
    split: str = "test"
    batch_size: int = 8
    max_new_tokens: int = 3  # greedy answer length: the longest answer is 3 tokens
    decode_tokens: int = 8  # tokens generated after the first one when timing decode speed
    timing_runs: int = 5  # interleaved (unpatched, patched) pairs per configuration
    timing_warmup: int = 1
    #: batch only questions whose prompts have the same length (no padding work; there are
    #: five prompt lengths, so batches stay full); False: in order, left-padded
    same_length: bool = True
    n_image: int = N_IMAGE_TOKENS  # visual tokens per image of the model
    seed: int = 0
    tasks: frozenset[str] = TASKS
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    bench: str = "vlm"  # marks the JSON as this bench's (``tokenmerge report``)


def vlm_methods() -> list[str]:
    """The registered methods that reduce an image's visual tokens (projector and decoder
    sites; the video-only ones are not)."""
    return [
        n
        for n, c in REGISTRY.items()
        if c.site in ("projector", "decoder") and not getattr(c, "video_only", False)
    ]


def validate(cfg: VLMBenchConfig) -> None:
    """Refuse a configuration before the model loads, in one line naming what is accepted."""
    accepted = vlm_methods()
    for m in cfg.methods:
        if m not in accepted:
            what = (
                "reduces video clips only, and this bench asks about images"
                if getattr(REGISTRY.get(m), "video_only", False)
                else "is not a VLM method"
            )
            raise ValueError(f"--methods: {m!r} {what}; accepted: {', '.join(accepted)}")
    if not cfg.methods:
        raise ValueError(f"--methods: give at least one of {', '.join(accepted)}")
    for k in cfg.keeps:
        if not isinstance(k, int) or not 1 <= k < cfg.n_image:
            raise ValueError(
                f"--budgets: visual tokens kept per image must be whole numbers from 1 to "
                f"{cfg.n_image - 1} (of {cfg.n_image}), got {k!r}"
            )
    if not cfg.keeps:
        raise ValueError("--budgets: give at least one number of visual tokens to keep")
    if cfg.n < len(KINDS):
        raise ValueError(f"--n: at least {len(KINDS)} questions (one per type), got {cfg.n}")
    unknown = set(cfg.tasks) - TASKS
    if unknown or not cfg.tasks:
        raise ValueError(f"--tasks: unknown {sorted(unknown)}; accepted: {', '.join(TASKS)}")
    if cfg.batch_size < 1 or cfg.timing_runs < 1 or cfg.max_new_tokens < 1:
        raise ValueError("batch size, timing runs and max_new_tokens must be at least 1")
    for name, params in cfg.method_params.items():
        if name in cfg.methods:
            REGISTRY[name](**params)  # the values, checked as the method checks them


def ratio_of(keep: int, n_image: int) -> float:
    """The methods' ``ratio`` (fraction of each image's tokens removed) that keeps ``keep``."""
    return 1.0 - keep / n_image


def quotas(n: int) -> dict[str, int]:
    """Questions per type: ``n`` split evenly over the types (the first types take the rest)."""
    base, extra = divmod(n, len(KINDS))
    return {k: base + (i < extra) for i, k in enumerate(KINDS)}


def make_questions(n: int, split: str = "test", seed: int = 0) -> tuple[list[Any], list[dict]]:
    """The scenes' images and ``n`` questions balanced over the types: ``(images, items)``
    with ``items[i] = {"id", "scene", "kind", "question", "answer"}`` in scene order (the
    images list holds one image per scene used)."""
    from .scenes import make_scenes, questions

    want = quotas(n)
    scenes: list[Any] = []
    while True:  # draw scenes until every type has its quota (position questions are rarest)
        scenes += make_scenes(max(2 * n // len(KINDS), 8), split, seed, start=len(scenes))
        qs = questions(scenes, seed)
        have = {k: sum(q.kind == k for _, q in qs) for k in KINDS}
        if all(have[k] >= want[k] for k in KINDS):
            break
        if len(scenes) > 50 * n:
            raise RuntimeError(f"could not find {want} questions in {len(scenes)} scenes")
    taken = dict.fromkeys(KINDS, 0)
    items = []
    for i, q in qs:
        if taken[q.kind] < want[q.kind]:
            taken[q.kind] += 1
            items.append({"scene": i, "kind": q.kind, "question": q.question, "answer": q.answer})
    used = sorted({it["scene"] for it in items})
    for j, it in enumerate(items):
        it["id"] = j
    return [scenes[i].image for i in used], _renumber(items, used)


def _renumber(items: list[dict], used: list[int]) -> list[dict]:
    """Scene numbers as given by the scenes module (``make_scene(index, split, seed)``);
    ``image`` is the index into the returned image list."""
    where = {s: j for j, s in enumerate(used)}
    return [it | {"image": where[it["scene"]]} for it in items]


def run(
    cfg: VLMBenchConfig,
    progress: Callable[[int], None] | None = None,
    loaded: tuple[Any, Any] | None = None,
    data: tuple[list[Any], list[dict]] | None = None,
) -> dict[str, Any]:
    """Run the bench: ``{"rows", "base", "questions", "timing_question", ...}``.

    ``loaded``: ``(model, inputs)`` instead of loading ``cfg.model`` from the zoo; ``data``:
    ``(images, items)`` instead of :func:`make_questions` (the tests pass both)."""
    import torch

    from ... import zoo
    from ...api import adapter_for
    from .measure import Measurer

    validate(cfg)
    torch.manual_seed(cfg.seed)
    model, inputs = loaded if loaded is not None else zoo.load(cfg.model)
    adapter_for(model)  # refuse an unsupported model before any work
    images, items = data if data is not None else make_questions(cfg.n, cfg.split, cfg.seed)
    m = Measurer(cfg, model, inputs, images, items, progress or (lambda k: None))
    if "accuracy" in cfg.tasks:
        m.quality()
    if "speed" in cfg.tasks:
        m.speed()
    return m.summary()


def planned_steps(cfg: VLMBenchConfig) -> int:
    """Progress-bar steps of a run: one per question and configuration (the unreduced one
    included), one per timed configuration."""
    configs = len(cfg.methods) * len(cfg.keeps)
    acc = (configs + 1) * cfg.n if "accuracy" in cfg.tasks else 0
    return acc + (configs if "speed" in cfg.tasks else 0)


def bootstrap_se(
    values: np.ndarray, base: np.ndarray | None = None, rounds: int = 1000, seed: int = 0
) -> float | None:
    """Bootstrap standard error over questions of ``mean(values)``
    (:func:`tokenmerge.eval.metrics.bootstrap_se`), or of ``mean(values) / mean(base)``
    (paired: the same resampled questions) when ``base`` is given; None under 2 questions."""
    from ..metrics import bootstrap_se as plain

    n = len(values)
    if n < 2:
        return None
    if base is None:
        return plain(values, np.mean, resamples=rounds, seed=seed)
    idx = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    den = base[idx].mean(1)
    ok = den > 0
    if not ok.any():
        return None
    return float((values[idx].mean(1)[ok] / den[ok]).std(ddof=1))
