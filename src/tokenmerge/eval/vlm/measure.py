"""What the VLM bench measures per configuration (method x visual tokens kept).

- **Answers**: greedy ``generate`` on left-padded batches; the first word is compared with the
  gold answer (``inputs.answers``), and with the unreduced model's answer (agreement).
- **Tokens, KV cache, FLOPs**: read from the prefill of that same ``generate`` call (a forward
  hook catches its first forward): the runtime's ``tokens_per_layer`` and kept slots
  (``rep``/``valid``), the cache's bytes right after the prefill, and the analytic FLOPs of the
  prefill: the LLM's layers at the counts each layer really ran on (the adapter's
  :class:`~tokenmerge.core.flops.CostModel`), the LM head on the last position, and the vision
  tower and projector, which every method runs unchanged.
- **Speed**: one question (batch 1) generated with ``1 + decode_tokens`` new tokens, the
  unpatched and the patched model alternately; the time to the end of the first forward is the
  TTFT, the rest over ``decode_tokens`` the time per decoded token. Ratios per pair, median and
  interquartile range, with the cores other processes took (:mod:`..cpuload`).

Video (``cfg.video``): the same with a clip (its frames, built by ``inputs.clips``) in place of
each image; the visual tokens are the clip's, and the vision tower and projector run on every
frame.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ...api import adapter_for, apply, remove
from ...core.flops import CostModel
from ...methods import get_method
from ..cpuload import OtherLoad
from ..llm.measure import spread_of
from ..throughput import toggle
from .bench import VLMBenchConfig, bootstrap_se

#: the key of the unreduced model's measurements
BASE = ("none", 0)


class _Prefill:
    """Forward hook: what the first forward of a ``generate`` call (its prefill) left."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.seen = model, None

    def __enter__(self) -> _Prefill:
        self.handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        from ...adapters.hf_decoder import runtime_of
        from ...adapters.hf_decoder.cache import kv_bytes

        if self.seen is not None:
            return
        run = runtime_of(module).last if hasattr(module, "_tokenmerge_decoder") else None
        cache = run.cache if run is not None and run.cache is not None else None
        cache = cache if cache is not None else getattr(output, "past_key_values", None)
        self.seen = {"run": run, "kv": kv_bytes(cache) if cache is not None else None}


def timed_generate(model: nn.Module, batch: dict, new: int) -> tuple[float, float]:
    """``(seconds to the end of the first forward, seconds per later token)`` of a greedy
    ``generate`` of exactly ``new`` tokens."""
    marks: list[float] = []
    handle = model.register_forward_hook(lambda *a: marks.append(time.perf_counter()))
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    finally:
        handle.remove()
    return marks[0] - t0, (marks[-1] - marks[0]) / max(len(marks) - 1, 1)


def fixed_flops(model: nn.Module, pixels: torch.Tensor, frames: int = 1) -> float:
    """FLOPs per image (or clip of ``frames`` frames) that no method changes: the vision tower
    (every layer, at its patch grid + CLS) and the projector's linear layers on every visual
    token, per frame, and the LM head on the last position."""
    vc, tc = model.config.vision_config, model.config.text_config
    p = vc.patch_size
    n_v = (pixels.shape[-2] // p) * (pixels.shape[-1] // p) + 1
    mlp = getattr(vc, "intermediate_size", None) or int(vc.hidden_size * vc.mlp_ratio)
    tower = CostModel(vc.num_hidden_layers, vc.hidden_size, mlp)
    vision = tower.flops(n_v, [n_v] * vc.num_hidden_layers)
    proj = model.model.multi_modal_projector
    linear = sum(
        2 * m.in_features * m.out_features for m in proj.modules() if isinstance(m, nn.Linear)
    )
    return frames * (vision + linear * (n_v - 1)) + 2 * tc.hidden_size * tc.vocab_size


def spread(xs: list[float]) -> tuple[float | None, list[float] | None]:
    """Median and ``[q1, q3]`` (``[min, max]`` under 4 values)."""
    med, lo, hi = spread_of(xs)
    return med, None if med is None else [lo, hi]


class Measurer:
    """Runs the configurations of ``cfg`` on ``model`` and keeps their measurements.

    ``visuals``: the images, or with ``cfg.video`` the clips (each a sequence of frames), that
    the ``items`` ask about (``item["image"]``, or ``item["video"]``, indexes them)."""

    def __init__(
        self,
        cfg: VLMBenchConfig,
        model: nn.Module,
        inputs: Any,
        visuals: list[Any],
        items: list[dict],
        tick: Callable[[int], None],
    ) -> None:
        self.cfg, self.model, self.inputs, self.tick = cfg, model, inputs, tick
        self.visuals, self.items = visuals, items
        self.configs = [(m, k) for m in cfg.methods for k in cfg.keeps]
        self.cost = adapter_for(model).target(model).cost
        self.acc: dict[tuple[str, float], dict[str, list]] = {}
        self.timing: dict[tuple[str, float], dict[str, Any]] = {}

    def method(self, name: str, keep: float) -> Any:
        ratio = self.cfg.ratio(keep)
        return get_method(name, ratio=ratio, **self.cfg.method_params.get(name, {}))

    def _batch(self, items: list[dict]) -> dict:
        questions = [it["question"] for it in items]
        if self.cfg.video:
            return self.inputs.clips([self.visuals[it["video"]] for it in items], questions)
        return self.inputs.batch([self.visuals[it["image"]] for it in items], questions)

    # ------------------------------------------------------------------ quality
    def batches(self) -> list[list[int]]:
        """Question indices per batch: with ``cfg.same_length``, questions whose prompts have
        the same length (no padding), else in order (left padding)."""
        order = list(range(len(self.items)))
        if self.cfg.same_length:
            length = [self._batch([it])["input_ids"].shape[1] for it in self.items]
            order.sort(key=lambda i: (length[i], i))
        bs, out = self.cfg.batch_size, []
        for i in order:
            if (
                out
                and len(out[-1]) < bs
                and (not self.cfg.same_length or length[out[-1][0]] == length[i])
            ):
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def quality(self) -> None:
        for idx in self.batches():
            batch = self._batch([self.items[i] for i in idx])
            self._answer(BASE, None, batch, idx)
            for key in self.configs:
                self._answer(key, self.method(*key), batch, idx)

    def _answer(self, key: tuple[str, float], method: Any, batch: dict, idx: list[int]) -> None:
        if method is not None:
            apply(self.model, method)
        try:
            with _Prefill(self.model) as pre, torch.inference_mode():
                out = self.model.generate(
                    **batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False
                )
        finally:
            if method is not None:
                remove(self.model)
        fields = ("answers", "visual", "visual_mean", "llm", "flops", "flops_full", "kv")
        rec = self.acc.setdefault(key, {f: [None] * len(self.items) for f in fields})
        got: dict[str, list] = {"answers": self.inputs.answers(out, batch)}
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        image = (ids == self.inputs.image_token_id) & real
        total = real.sum(1)  # tokens of the unreduced prefill
        run = pre.seen["run"]
        if run is None:  # unpatched: every layer runs on every token
            tpl = total[:, None].expand(-1, self.cost.depth)
            final = image.sum(1)
        else:
            tpl = torch.stack([t.cpu() for t in run.tokens_per_layer], 1)
            if tpl.shape[1] != self.cost.depth:
                raise RuntimeError(f"{key}: {tpl.shape[1]} layers recorded, {self.cost.depth} run")
            # the visual tokens the last layer held, from the kept slots' original positions
            where = (run.rep - run.seen).clamp(0, ids.shape[1] - 1).cpu()
            final = (image.gather(1, where) & run.valid.cpu()).sum(1)
            if not torch.equal(final, tpl[:, -1] - (total - image.sum(1))):
                raise RuntimeError(f"{key}: kept slots and tokens_per_layer disagree")
        visual = tpl - (total - image.sum(1))[:, None]
        frames = batch["pixel_values"].shape[0] // ids.shape[0]  # per question: 1, or a clip's
        fixed = fixed_flops(self.model, batch["pixel_values"], frames)
        flops = lambda t: self.cost.layer_flops(t, t).sum(1) + fixed  # noqa: E731
        got["visual"] = final.tolist()
        got["visual_mean"] = visual.double().mean(1).tolist()
        got["llm"] = tpl.double().mean(1).tolist()
        got["flops"] = flops(tpl.double()).tolist()
        got["flops_full"] = flops(total[:, None].double().expand(-1, self.cost.depth)).tolist()
        kv = pre.seen["kv"]
        got["kv"] = [None if kv is None else kv / ids.shape[0]] * ids.shape[0]
        for f, values in got.items():
            for i, v in zip(idx, values, strict=True):
                rec[f][i] = v
        self.tick(len(idx))

    # ------------------------------------------------------------------ speed
    def speed(self) -> None:
        """TTFT and decode speed of one question, interleaved with the unpatched model."""
        cfg, it = self.cfg, self.items[0]
        batch = self._batch([it])
        new = cfg.decode_tokens + 1
        for key in self.configs:
            switch = toggle(self.model, self.method(*key))

            def pair(switch=switch) -> tuple[tuple[float, float], tuple[float, float]]:
                b = timed_generate(self.model, batch, new)
                switch(True)
                try:
                    return b, timed_generate(self.model, batch, new)
                finally:
                    switch(False)

            for _ in range(cfg.timing_warmup):
                pair()
            with OtherLoad() as load:
                pairs = [pair() for _ in range(cfg.timing_runs)]
            ttft, ttft_iqr = spread([p[0] / b[0] for b, p in pairs])
            dec, dec_iqr = spread([b[1] / p[1] for b, p in pairs])
            self.timing[key] = {
                "ttft_ratio": ttft, "ttft_iqr": ttft_iqr, "decode_ratio": dec,
                "decode_iqr": dec_iqr, "other_load": load.cores,
                "base_ttft_ms": 1e3 * statistics.median(b[0] for b, _ in pairs),
                "ttft_ms": 1e3 * statistics.median(p[0] for _, p in pairs),
                "base_decode_tps": statistics.median(1 / b[1] for b, _ in pairs),
            }  # fmt: skip
            self.tick(1)

    # ------------------------------------------------------------------ summary
    def _row(self, key: tuple[str, float]) -> dict[str, Any]:
        cfg, (name, keep) = self.cfg, key
        base = key == BASE
        keep = cfg.full if base else keep
        row: dict[str, Any] = {
            "method": "unreduced" if base else name,
            "site": None if base else self.method(name, keep).site,
            "keep": keep,
            "ratio": 0.0 if base else cfg.ratio(keep),
            "budget": f"{keep:g}%" if cfg.video else f"{keep}/{cfg.n_image}",
            "params": None if base else _params(self.method(name, keep)),
        }
        if cfg.video:  # the visual tokens per clip that the % means
            row["keep_tokens"] = cfg.tokens(keep)
        rec, ref = self.acc.get(key), self.acc.get(BASE)
        if rec is not None and ref is not None:
            gold = [it["answer"] for it in self.items]
            ok = np.array([a == g for a, g in zip(rec["answers"], gold, strict=True)], float)
            ok0 = np.array([a == g for a, g in zip(ref["answers"], gold, strict=True)], float)
            agree = np.array(
                [a == b for a, b in zip(rec["answers"], ref["answers"], strict=True)], float
            )
            kinds = np.array([it["kind"] for it in self.items])
            acc0 = ok0.mean()
            kv = [x for x in rec["kv"] if x is not None]
            kv0 = [x for x in ref["kv"] if x is not None]
            row |= {
                "questions": len(ok),
                "acc": float(ok.mean()),
                "acc_se": float(np.sqrt(ok.mean() * (1 - ok.mean()) / len(ok))),
                "pct_full": 100 * float(ok.mean() / acc0) if acc0 > 0 else None,
                "pct_full_se": _times(100, bootstrap_se(ok, ok0, seed=cfg.seed)),
                "agreement": float(agree.mean()),
                "agreement_se": bootstrap_se(agree, seed=cfg.seed),
                "tokens": float(np.mean(rec["visual"])),
                "tokens_mean_layers": float(np.mean(rec["visual_mean"])),
                "llm_tokens": float(np.mean(rec["llm"])),
                "kv_mb": float(np.mean(kv)) / 2**20 if kv else None,
                "kv_ratio": float(np.mean(kv) / np.mean(kv0)) if kv and kv0 else None,
                "flops_ratio": float(np.sum(rec["flops"]) / np.sum(rec["flops_full"])),
                "gflops": float(np.mean(rec["flops"])) / 1e9,
                "answers": rec["answers"],
            }
            for k in cfg.kinds:
                sel = kinds == k
                row[f"acc_{k}"] = float(ok[sel].mean()) if sel.any() else None
                full = ok0[sel].mean() if sel.any() else 0.0
                row[f"pct_{k}"] = 100 * float(ok[sel].mean() / full) if full > 0 else None
        if base and self.timing:  # its own times: the median over every configuration's pairs
            t = self.timing.values()
            row |= {"ttft_ratio": 1.0, "decode_ratio": 1.0,
                    "ttft_ms": statistics.median(x["base_ttft_ms"] for x in t),
                    "decode_tps": statistics.median(x["base_decode_tps"] for x in t)}  # fmt: skip
        return row | self.timing.get(key, {})

    def summary(self) -> dict[str, Any]:
        from . import clips, scenes

        chance = (clips if self.cfg.video else scenes).chance
        rows = [self._row(BASE)] + [self._row(k) for k in self.configs]
        n_by_type = {k: sum(it["kind"] == k for it in self.items) for k in self.cfg.kinds}
        loads = [t["other_load"] for t in self.timing.values() if t["other_load"] is not None]
        return {
            "rows": rows,
            "questions": self.items,
            "n_by_type": n_by_type,
            "chance": chance(),
            "timing_question": self.items[0]["id"] if self.timing else None,
            "other_load": max(loads) if loads else None,
            "other_load_mean": float(np.mean(loads)) if loads else None,
            "llm_depth": self.cost.depth,
        }


def _times(k: float, x: float | None) -> float | None:
    return None if x is None else k * x


def _params(method: Any) -> dict[str, Any]:
    from .. import report

    return report.method_params(method, f"ratio={method.ratio:.4f}")
