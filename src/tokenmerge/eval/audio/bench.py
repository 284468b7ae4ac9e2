"""The Whisper benchmark: transcripts and speed of ``whisper-tiny-en`` with its encoder
reduced, against the unreduced model, on real and synthesised speech.

Every method runs at the same budgets: the tokens left after the encoder, out of its 1500
(default 750, 375, 188, 94; the 4 layers of tiny.en can halve the tokens at most once each,
so 94 is the floor of the merging methods). A method reaches a budget ``k`` by keeping the
same share ``q = (k / 1500)^(1/L)`` in every layer (``tm.KeepRatio(q)``); DToMe is
calibrated at that budget on held-out synthesised clips and then keeps as many tokens as each
clip needs (its count is a mean). The ``truncate`` baseline keeps the first ``k`` tokens
(whisper.cpp's ``audio_ctx``).

Per method and budget: WER against the reference transcripts (all clips, real speech,
synthesised speech; after :func:`~.wer.normalize`), agreement with the unreduced transcript,
tokens kept per clip (mean, spread), the encoder's analytic FLOPs, and two speed-ups measured
against the unpatched model in the same process, interleaved: the encoder alone and the whole
``generate`` (greedy, batch ``timing_batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...adapters.base import ATTR
from ...api import apply, remove, state, summary
from ...core.budget import KeepRatio
from ...methods import REGISTRY
from ...methods.base import Method
from ...tune.calibration import calibrate
from ..throughput import interleave, toggle
from .data import Clip, describe, speech_clips
from .truncate import Truncate
from .wer import normalize, wer, word_errors

#: the methods benchmarked by default (``truncate``: the shorter-context baseline)
METHODS: tuple[str, ...] = ("tome", "pitome", "dtome", "random", "truncate")
#: tokens kept after the encoder, of Whisper's 1500
KEEPS: tuple[int, ...] = (750, 375, 188, 94)
#: the models the bench knows how to feed
MODELS: tuple[str, ...] = ("whisper-tiny-en",)
#: a 30 s window: 3000 mel frames, 1500 encoder tokens
N_TOKENS = 1500
_GRID_ONLY = ("m3",)  # pools a 2-D image grid


@dataclass
class AudioBenchConfig:
    """One run of the Whisper bench (``tokenmerge bench --model whisper-tiny-en``)."""

    model: str = "whisper-tiny-en"
    methods: tuple[str, ...] = METHODS
    keeps: tuple[int, ...] = KEEPS
    n: int = 110  # clips scored: the 10 real ones, then synthesised ones
    calibration: int = 16  # further synthesised clips, DToMe's calibration only
    batch_size: int = 8
    max_new_tokens: int = 96
    timing_runs: int = 5
    timing_warmup: int = 1
    timing_batch: int = 8
    seed: int = 0
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)


def audio_methods() -> list[str]:
    """The method names the bench accepts: block-site methods that run on a sequence, and
    ``truncate``."""
    block = [n for n, c in REGISTRY.items() if c.site == "block" and n not in _GRID_ONLY]
    return [*sorted(block), "truncate"]


def validate(cfg: AudioBenchConfig) -> None:
    """Refuse a bad configuration, naming the accepted values, before anything loads."""
    if cfg.model not in MODELS:
        raise ValueError(f"the Whisper bench runs on {', '.join(MODELS)}, not {cfg.model!r}")
    known = audio_methods()
    bad = [m for m in cfg.methods if m not in known]
    if bad or not cfg.methods:
        raise ValueError(f"unknown or unsupported methods {bad}; accepted: {', '.join(known)}")
    floor = -(-N_TOKENS // 16)  # four halvings
    for k in cfg.keeps:
        if not isinstance(k, int) or not floor <= k < N_TOKENS:
            raise ValueError(
                f"--budgets are tokens kept after the encoder, whole numbers from {floor} (the "
                f"merging methods halve the tokens at most once per layer) to {N_TOKENS - 1}; "
                f"got {k!r}"
            )
    for name, value, low in (
        ("--n", cfg.n, 2),
        ("--batch-size", cfg.batch_size, 1),
        ("--timing-runs", cfg.timing_runs, 1),
        ("bench.calibration", cfg.calibration, 1),
        ("bench.max_new_tokens", cfg.max_new_tokens, 1),
        ("bench.timing_batch", cfg.timing_batch, 1),
        ("bench.timing_warmup", cfg.timing_warmup, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    unknown = sorted(set(cfg.method_params) - set(cfg.methods))
    if unknown:
        raise ValueError(f"--param for methods not benchmarked: {unknown}")


def planned_steps(cfg: AudioBenchConfig) -> int:
    """Progress steps: the unreduced transcripts, then a transcription and a timing per run."""
    return 1 + 2 * len(cfg.methods) * len(cfg.keeps)


def budget(name: str, keep: int, depth: int) -> Any:
    """The budget reaching ``keep`` tokens after ``depth`` layers (module docstring)."""
    if name == "truncate":
        return [N_TOKENS - keep] + [0] * (depth - 1)
    return KeepRatio((keep / N_TOKENS) ** (1 / depth))


def make_method(cfg: AudioBenchConfig, name: str, keep: int, depth: int) -> Method:
    """The method ``name`` at budget ``keep``, with its ``--param`` values."""
    params = {**cfg.method_params.get(name, {}), "r": budget(name, keep, depth)}
    return Truncate(**params) if name == "truncate" else REGISTRY[name](**params)


@dataclass
class Transcripts:
    """One pass over the clips: the texts, the encoder tokens kept per clip, and the encoder's
    FLOPs ratio (mean over clips)."""

    texts: list[str]
    tokens: list[int]
    flops_ratio: float


@torch.inference_mode()
def transcribe(
    model: nn.Module, processor: Any, feats: torch.Tensor, cfg: AudioBenchConfig
) -> Transcripts:
    """Greedy transcripts of the mel batches ``feats`` (``[N, n_mels, 3000]``)."""
    texts: list[str] = []
    tokens: list[int] = []
    flops = 0.0
    patched = hasattr(model, ATTR)
    for i in range(0, len(feats), cfg.batch_size):
        batch = feats[i : i + cfg.batch_size]
        out = model.generate(batch, max_new_tokens=cfg.max_new_tokens, do_sample=False)
        texts += [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
        if patched:
            tokens += state(model).counts.tolist()
            flops += summary(model)["flops_ratio"] * len(batch)
        else:
            tokens += [N_TOKENS] * len(batch)
            flops += len(batch)
    return Transcripts(texts, tokens, flops / len(feats))


def features(processor: Any, clips: Sequence[Clip]) -> torch.Tensor:
    """Whisper's log-mel input of every clip, padded to 30 s."""
    fe = processor.feature_extractor
    audio = [c.audio for c in clips]
    return fe(audio, sampling_rate=fe.sampling_rate, return_tensors="pt").input_features


def _bootstrap_se(refs: Sequence[str], hyps: Sequence[str], seed: int, draws: int = 400) -> float:
    """Standard error of the corpus WER, resampling clips."""
    errs = np.array([word_errors(r, h) for r, h in zip(refs, hyps, strict=True)], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(errs), size=(draws, len(errs)))
    picked = errs[idx]  # [draws, n, 2]
    return float((picked[..., 0].sum(1) / np.maximum(picked[..., 1].sum(1), 1)).std())


def scores(
    clips: Sequence[Clip], texts: Sequence[str], base: Sequence[str], seed: int
) -> dict[str, Any]:
    """WER (all, real, synthesised, with a bootstrap SE), agreement with ``base`` (the
    unreduced transcripts) and the WER taking ``base`` as the reference."""
    refs = [c.text for c in clips]
    real = [i for i, c in enumerate(clips) if c.source != "espeak"]
    synth = [i for i, c in enumerate(clips) if c.source == "espeak"]

    def sub(idx: list[int]) -> float | None:
        return wer([refs[i] for i in idx], [texts[i] for i in idx]) if idx else None

    same = [normalize(t) == normalize(b) for t, b in zip(texts, base, strict=True)]
    agree = float(np.mean(same))
    return {
        "wer": wer(refs, texts),
        "wer_se": _bootstrap_se(refs, texts, seed),
        "wer_real": sub(real),
        "wer_espeak": sub(synth),
        "agreement": agree,
        "agreement_se": float(np.sqrt(agree * (1 - agree) / len(same))),
        "wer_vs_unreduced": wer(list(base), list(texts)),
    }


def _token_stats(tokens: Sequence[int]) -> dict[str, Any]:
    t = np.asarray(tokens, dtype=float)
    return {
        "tokens": float(t.mean()),
        "tokens_std": float(t.std()),
        "tokens_range": [int(t.min()), int(t.max())],
    }


def _speed(
    model: nn.Module, method: Method, feats: torch.Tensor, cfg: AudioBenchConfig
) -> dict[str, Any]:
    """Encoder and end-to-end speed-ups, interleaved against the unpatched model."""
    encoder = model.get_encoder()

    def enc() -> object:
        return encoder(feats)

    def gen() -> object:
        return model.generate(feats, max_new_tokens=cfg.max_new_tokens, do_sample=False)

    out: dict[str, Any] = {}
    for key, fn in (("encoder", enc), ("e2e", gen)):
        t = interleave(
            fn, fn, len(feats), cfg.timing_runs, cfg.timing_warmup, between=toggle(model, method)
        )
        out[f"{key}_ratio"] = t.ratio
        out[f"{key}_iqr"] = list(t.iqr) if t.iqr else None
        out[f"{key}_base_s"] = t.base_s
        out[f"{key}_reduced_s"] = t.reduced_s
        out[f"{key}_other_load"] = t.other_load
    return out


def run(cfg: AudioBenchConfig, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the bench; returns ``{"rows": [...], "data": describe(clips), ...}``."""
    from ..zoo.whisper import load_whisper

    validate(cfg)
    tick = progress or (lambda k: None)
    torch.manual_seed(cfg.seed)
    clips = speech_clips(cfg.n + cfg.calibration, seed=cfg.seed)
    scored, held_out = clips[: cfg.n], clips[cfg.n :]
    model, processor = load_whisper(cfg.model)
    depth = len(model.get_encoder().layers)
    feats = features(processor, scored)
    cal_feats = features(processor, held_out)
    timing_idx = np.linspace(0, cfg.n - 1, min(cfg.timing_batch, cfg.n)).round().astype(int)
    timing = feats[torch.as_tensor(np.unique(timing_idx))]

    base = transcribe(model, processor, feats, cfg)
    tick(1)
    rows = [
        {
            "method": "unreduced",
            "budget": N_TOKENS,
            **_token_stats(base.tokens),
            "flops_ratio": 1.0,
            **scores(scored, base.texts, base.texts, cfg.seed),
        }
    ]
    examples: dict[str, dict[str, str]] = {}
    for name in cfg.methods:
        for keep in cfg.keeps:
            method = make_method(cfg, name, keep, depth)
            if name == "dtome":
                calibrate(
                    model,
                    method,
                    cal_feats.split(cfg.batch_size),
                    r=method.r,
                    forward=lambda m, x: m.get_encoder()(x),
                )
            apply(model, method)
            try:
                got = transcribe(model, processor, feats, cfg)
            finally:
                remove(model)
            tick(1)
            row = {
                "method": name,
                "budget": keep,
                **_token_stats(got.tokens),
                "flops_ratio": got.flops_ratio,
                **scores(scored, got.texts, base.texts, cfg.seed),
                **_speed(model, method, timing, cfg),
            }
            row["throughput_ratio"] = row["e2e_ratio"]  # the plot's x axis
            row["throughput_iqr"] = row["e2e_iqr"]
            rows.append(row)
            tick(1)
            # the first clip whose transcript changed, for the report
            for c, t, b in zip(scored, got.texts, base.texts, strict=True):
                if normalize(t) != normalize(b):
                    examples[f"{name}@{keep}"] = {"clip": c.name, "reduced": t, "unreduced": b}
                    break
    loads = [
        r[k] for r in rows for k in ("encoder_other_load", "e2e_other_load") if r.get(k) is not None
    ]
    return {
        "rows": rows,
        "data": describe(scored),
        "calibration_clips": len(held_out),
        "depth": depth,
        "timing_clips": len(timing),
        "unreduced_transcripts": {c.name: t for c, t in zip(scored, base.texts, strict=True)},
        "references": {c.name: c.text for c in scored},
        "examples": examples,
        "other_load": max(loads) if loads else None,
        "other_load_mean": float(np.mean(loads)) if loads else None,
    }
