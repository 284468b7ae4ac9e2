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

**Video** (``--tasks video``). The same, asking about held-out synthetic clips
(:mod:`.clips`, every clip ``frames`` frames long) instead of images, with questions balanced
over :data:`.clips.CLIP_KINDS`. A clip's frames are given back to back (``frames x 256``
placeholders), and the VLM adapter reduces them as one clip. A budget is the % of the clip's
visual tokens kept (50 / 25 / 10 / 5), i.e. ``ratio = 1 - pct / 100``; the methods are the
video baselines (frame subsampling, random pruning, per-frame pooling) and the video methods
of :data:`VIDEO_BENCH_METHODS` that are registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...methods import REGISTRY
from ...methods.decoder import DECODER_METHODS
from ...methods.projector import PROJECTOR_METHODS
from .clips import CLIP_KINDS
from .prompt import N_IMAGE_TOKENS
from .scenes import KINDS

#: LLaVA-1.5's 576 visual tokens -> 192 / 128 / 64 (VisionZip's budgets), scaled to 256; and 16
KEEPS: tuple[int, ...] = (85, 57, 28, 16)
#: every method the bench runs by default, in report order
METHODS: tuple[str, ...] = (*PROJECTOR_METHODS, *DECODER_METHODS)
#: the measuring tasks ``--tasks`` may choose (the default: all)
TASKS = frozenset({"accuracy", "speed"})
#: the task that asks about video clips instead of images (alone: with every measuring task)
VIDEO = "video"
#: video: % of each clip's visual tokens kept
PCTS: tuple[float, ...] = (50, 25, 10, 5)
#: video: the methods run by default, in report order (those registered): the baselines
#: (frame subsampling, random pruning, per-frame pooling), the video methods, and image methods
VIDEO_BENCH_METHODS: tuple[str, ...] = (
    "frame_subsample", "random_proj", "downsample_proj", "tempme", "holitom", "framefusion",
    "dart", "aim_merge", "fastv",
)  # fmt: skip
#: video: frames per clip (``--param bench.frames``), default and accepted range
FRAMES, MIN_FRAMES, MAX_FRAMES = 8, 2, 32


@dataclass
class VLMBenchConfig:
    """One run of the VLM bench. ``methods`` and ``keeps`` default to the task's own
    (images: :data:`METHODS`, :data:`KEEPS`; video: the registered
    :data:`VIDEO_BENCH_METHODS`, :data:`PCTS`)."""

    model: str = "tiny-llava"
    methods: tuple[str, ...] | None = None  # None: the task's default (set on construction)
    #: the budgets: visual tokens kept per image; video: % of each clip's visual tokens kept
    keeps: tuple[float, ...] | None = None  # None: the task's default (set on construction)
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
    n_image: int = N_IMAGE_TOKENS  # visual tokens per image (video: per frame) of the model
    frames: int = FRAMES  # video: frames per clip
    seed: int = 0
    tasks: frozenset[str] = TASKS  # with VIDEO: clips (VIDEO alone: and every measuring task)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    bench: str = "vlm"  # marks the JSON as this bench's (``tokenmerge report``)

    def __post_init__(self) -> None:
        self.tasks = frozenset(self.tasks)
        if self.tasks == {VIDEO}:
            self.tasks = TASKS | {VIDEO}
        if self.methods is None:
            self.methods = video_default() if self.video else METHODS
        if self.keeps is None:
            self.keeps = PCTS if self.video else KEEPS

    @property
    def video(self) -> bool:
        """Whether the run asks about video clips rather than images."""
        return VIDEO in self.tasks

    @property
    def kinds(self) -> tuple[str, ...]:
        """The question types of the data."""
        return CLIP_KINDS if self.video else KINDS

    @property
    def n_visual(self) -> int:
        """Visual tokens per image, or per clip (``frames x n_image``)."""
        return self.n_image * self.frames if self.video else self.n_image

    @property
    def full(self) -> float:
        """The budget that keeps everything (the unreduced model's): ``n_image``, or 100 %."""
        return 100 if self.video else self.n_image

    def ratio(self, keep: float) -> float:
        """The methods' ``ratio`` (fraction of each image's or clip's tokens removed) at
        budget ``keep``."""
        return 1.0 - keep / 100 if self.video else ratio_of(keep, self.n_image)

    def tokens(self, keep: float) -> float:
        """The visual tokens per image or clip that budget ``keep`` means."""
        return keep * self.n_visual / 100 if self.video else keep


def vlm_methods() -> list[str]:
    """The registered methods that reduce an image's visual tokens (projector and decoder
    sites; the video-only ones are not)."""
    return [
        n
        for n, c in REGISTRY.items()
        if c.site in ("projector", "decoder") and not getattr(c, "video_only", False)
    ]


def video_methods() -> list[str]:
    """The registered methods that reduce a clip's visual tokens: every projector and decoder
    method (the video-only ones included) and the registered :data:`VIDEO_BENCH_METHODS`."""
    sited = [n for n, c in REGISTRY.items() if c.site in ("projector", "decoder")]
    return [*sited, *(n for n in VIDEO_BENCH_METHODS if n in REGISTRY and n not in sited)]


def video_default() -> tuple[str, ...]:
    """The video task's default methods: :data:`VIDEO_BENCH_METHODS` that are registered."""
    return tuple(n for n in VIDEO_BENCH_METHODS if n in REGISTRY)


def validate(cfg: VLMBenchConfig) -> None:
    """Refuse a configuration before the model loads, in one line naming what is accepted."""
    accepted = video_methods() if cfg.video else vlm_methods()
    for m in cfg.methods:
        if m not in accepted:
            what = (
                "reduces video clips only, and this bench asks about images (--tasks video "
                "asks about clips)"
                if getattr(REGISTRY.get(m), "video_only", False)
                else "is not a VLM method"
            )
            raise ValueError(f"--methods: {m!r} {what}; accepted: {', '.join(accepted)}")
    if not cfg.methods:
        raise ValueError(f"--methods: give at least one of {', '.join(accepted)}")
    for k in cfg.keeps:
        if cfg.video:
            if isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k < 100:
                raise ValueError(
                    f"--budgets: for --tasks video a budget is the % of each clip's visual "
                    f"tokens kept, a whole or decimal number above 0 and below 100 (e.g. "
                    f"{','.join(f'{p:g}' for p in PCTS)}), got {k!r}"
                )
        elif not isinstance(k, int) or not 1 <= k < cfg.n_image:
            raise ValueError(
                f"--budgets: visual tokens kept per image must be whole numbers from 1 to "
                f"{cfg.n_image - 1} (of {cfg.n_image}), got {k!r}"
            )
    if not cfg.keeps:
        raise ValueError("--budgets: give at least one number of visual tokens to keep")
    if cfg.video and (
        isinstance(cfg.frames, bool)
        or not isinstance(cfg.frames, int)
        or not MIN_FRAMES <= cfg.frames <= MAX_FRAMES
    ):
        raise ValueError(
            f"--param bench.frames: frames per clip must be a whole number from {MIN_FRAMES} "
            f"to {MAX_FRAMES}, got {cfg.frames!r}"
        )
    kinds = cfg.kinds
    if cfg.n < len(kinds):
        raise ValueError(f"--n: at least {len(kinds)} questions (one per type), got {cfg.n}")
    unknown = set(cfg.tasks) - TASKS - {VIDEO}
    if unknown or not cfg.tasks:
        accepted_tasks = ", ".join([*sorted(TASKS), VIDEO])
        raise ValueError(f"--tasks: unknown {sorted(unknown)}; accepted: {accepted_tasks}")
    if cfg.batch_size < 1 or cfg.timing_runs < 1 or cfg.max_new_tokens < 1:
        raise ValueError("batch size, timing runs and max_new_tokens must be at least 1")
    for name, params in cfg.method_params.items():
        if name in cfg.methods:
            REGISTRY[name](**params)  # the values, checked as the method checks them


def ratio_of(keep: int, n_image: int) -> float:
    """The methods' ``ratio`` (fraction of each image's tokens removed) that keeps ``keep``."""
    return 1.0 - keep / n_image


def quotas(n: int, kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """Questions per type: ``n`` split evenly over the types (the first types take the rest)."""
    base, extra = divmod(n, len(kinds))
    return {k: base + (i < extra) for i, k in enumerate(kinds)}


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


def make_clip_questions(
    n: int, split: str = "test", seed: int = 0, frames: int = FRAMES
) -> tuple[list[tuple[Any, ...]], list[dict]]:
    """Clips of ``frames`` frames and ``n`` questions balanced over
    :data:`~.clips.CLIP_KINDS`: ``(clips, items)``, each clip its tuple of frames, with
    ``items[i] = {"id", "clip", "video", "kind", "question", "answer"}`` in clip order (a clip's
    own questions in its order). ``clip`` is the number of :func:`.clips.make_clip`
    (``make_clip(clip, split, seed, frames)``), ``video`` the index into the returned list,
    which holds the clips used only."""
    from .clips import make_clip

    want, taken = quotas(n, CLIP_KINDS), dict.fromkeys(CLIP_KINDS, 0)
    clips: list[tuple[Any, ...]] = []
    items: list[dict] = []
    index = 0
    while taken != want:  # draw clips until every type has its quota (motion is rarest)
        if index >= 50 * n:
            raise RuntimeError(f"could not find {want} questions in {index} clips")
        clip = make_clip(index, split, seed, frames)
        for q in clip.qas:
            if taken[q.kind] < want[q.kind]:
                taken[q.kind] += 1
                where = {"id": len(items), "clip": index, "video": len(clips)}
                items.append(where | {"kind": q.kind, "question": q.question, "answer": q.answer})
        if items and items[-1]["clip"] == index:
            clips.append(clip.frames)
        index += 1
    return clips, items


def run(
    cfg: VLMBenchConfig,
    progress: Callable[[int], None] | None = None,
    loaded: tuple[Any, Any] | None = None,
    data: tuple[list[Any], list[dict]] | None = None,
) -> dict[str, Any]:
    """Run the bench: ``{"rows", "base", "questions", "timing_question", ...}``.

    ``loaded``: ``(model, inputs)`` instead of loading ``cfg.model`` from the zoo; ``data``:
    ``(images, items)`` instead of :func:`make_questions`, or for video ``(clips, items)``
    instead of :func:`make_clip_questions` (the tests pass both)."""
    import torch

    from ... import zoo
    from ...api import adapter_for
    from .measure import Measurer

    validate(cfg)
    torch.manual_seed(cfg.seed)
    model, inputs = loaded if loaded is not None else zoo.load(cfg.model)
    adapter_for(model)  # refuse an unsupported model before any work
    if data is None:
        data = (
            make_clip_questions(cfg.n, cfg.split, cfg.seed, cfg.frames)
            if cfg.video
            else make_questions(cfg.n, cfg.split, cfg.seed)
        )
    m = Measurer(cfg, model, inputs, *data, progress or (lambda k: None))
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
