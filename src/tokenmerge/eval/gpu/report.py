"""The GPU benchmark's report: rows saved as they come (JSON and Markdown, so a run cut
short still leaves its results), one Markdown table per part, one printed line per row."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ...adapters.base import ATTR
from ...api import remove
from .. import report
from .config import Clock, Device

PARTS = ("vision-speed", "vision-fidelity", "llm-kv")
TITLES = {
    "vision-speed": "Vision speed: ToMe and autotuned plans (timm, random weights)",
    "vision-fidelity": "Vision fidelity: ToMe on DINOv2-S (real weights, real photos)",
    "llm-kv": "LLM KV-cache methods (random weights, published configs)",
}
NOTES = {
    "vision-speed": (
        "Speed-up: median over interleaved pairs (unpatched, patched) on the same model object "
        "and batch, with the interquartile range of the per-pair ratios; a range that holds 1.0 "
        "is no measurable speed-up. Images/s: the medians' throughput. The timm models use "
        "their fused attention (SDPA); the baseline is always the unpatched model. Tokens: "
        "per image at the input and after the last block. FLOPs: analytic, against the "
        "unreduced model at the native size. Autotune rows: `tm.autotune(speedup=target)` with "
        "a short time budget on random pixels (with random weights its fidelity score means "
        "nothing; the plan's speed does), then timed like the ToMe rows."
    ),
    "vision-fidelity": (
        "CLS-token cosine of ToMe against the unreduced model in the same dtype on the device "
        "(mean, 5th percentile, minimum over the images); `cos fp32`: against the unreduced "
        "model in float32. r = 0 is the unreduced model itself."
    ),
    "llm-kv": (
        "One prefill of a random-token context, then greedy decoding, with the model patched "
        "by each method (the prefill compresses each layer right after its attention). "
        "Prefill speed-up: median (IQR) of interleaved pairs against the unpatched prefill; "
        "decode: median seconds per token over the decoded tokens, against the unpatched "
        "model with the full cache (> 1: faster). Peak: `torch.cuda.max_memory_allocated` "
        "during the prefill, above what was allocated before it (weights and the reference "
        "cache), and its ratio to the unpatched prefill's. KV kept: fraction of the "
        "context's entries every layer and head holds after the prefill. Attention: the "
        "implementation the model ran with; no method switches it: scorers that read "
        "attention (SnapKV, PyramidKV, H2O, TOVA, KVzip) compute softmax(qKᵀ) explicitly "
        "for the queries they score, beside the model's SDPA."
    ),
}
_NOTE = ("note", "note")
COLUMNS: dict[str, list[tuple[Any, str]]] = {
    "vision-speed": [
        ("model", "model"),
        ("dtype", "dtype"),
        ("method", "method"),
        ("budget", "budget"),
        ("input", "input"),
        ("tokens", "tokens"),
        ("flops_ratio", "FLOPs"),
        (("speedup", "speedup_iqr"), "speed-up (IQR)"),
        ("img_s_", "img/s"),
        ("base_img_s_", "base img/s"),
        _NOTE,
    ],
    "vision-fidelity": [
        ("dtype", "dtype"),
        ("r", "r"),
        ("tokens_out", "tokens"),
        ("cos", "CLS cos"),
        ("cos_p05", "p05"),
        ("cos_min", "min"),
        ("cos_fp32", "cos fp32"),
        _NOTE,
    ],
    "llm-kv": [
        ("model", "model"),
        ("context", "context"),
        ("label", "method"),
        ("kv_kept", "KV kept"),
        ("kv_mb", "KV MB"),
        ("prefill_ms", "prefill ms"),
        (("prefill_speedup", "prefill_iqr"), "prefill speed-up (IQR)"),
        ("decode_ms", "decode ms/token"),
        ("decode_speedup", "decode speed-up"),
        ("peak_extra_mb_", "prefill peak MB"),
        ("peak_ratio", "peak ×"),
        ("attention", "attention"),
        _NOTE,
    ],
}


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the table's derived cells (whole numbers where decimals are noise)."""
    out = dict(row)
    if row.get("input_size"):
        out["input"] = "×".join(str(v) for v in row["input_size"])
    if row.get("tokens_out") is not None and row.get("tokens_in") is not None:
        out["tokens"] = f"{row['tokens_in']:.0f} → {row['tokens_out']:.0f}"
    for k in ("img_s", "base_img_s", "peak_extra_mb"):
        if row.get(k) is not None:
            out[k + "_"] = round(row[k])
    cells = (
        ("tokens_out", 0),
        ("prefill_ms", 1),
        ("decode_ms", 2),
        ("cos", 4),
        ("cos_p05", 4),
        ("cos_min", 4),
        ("cos_fp32", 4),
    )
    for k, digits in cells:
        if isinstance(row.get(k), float):  # strings: shown as they are
            out[k] = f"{row[k]:.{digits}f}"
    out["note"] = row.get("error") or row.get("skipped") or ""
    return out


class Recorder:
    """The run's rows and notes, written to ``<out>/<stem>.json`` and ``.md`` on every change."""

    def __init__(self, out: Path, stem: str, meta: dict[str, Any], clock: Clock) -> None:
        self.out, self.stem, self.meta, self.clock = Path(out), stem, meta, clock
        self.rows: list[dict[str, Any]] = []
        self.meta.setdefault("notes", {})
        self.meta.setdefault("status", "running")
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def paths(self) -> tuple[Path, Path]:
        return self.out / f"{self.stem}.json", self.out / f"{self.stem}.md"

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(f"[{self.clock.elapsed():5.0f} s] {line(row)}", flush=True)
        self.save()

    def skip_part(self, part: str, text: str) -> None:
        """A part that cannot run here: said on screen and in the report, not an error."""
        self.meta["notes"].setdefault(part, []).append(text)
        print(f"[{self.clock.elapsed():5.0f} s] {text}", flush=True)
        self.save()

    def save(self) -> None:
        self.meta["seconds"] = round(self.clock.elapsed(), 1)
        js, md = self.paths
        report.write_json(js, self.meta, self.rows)
        md.write_text(markdown(self.rows, self.meta))

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("error")]


def attempt(
    rec: Recorder,
    clock: Clock,
    dev: Device,
    model: nn.Module,
    key: dict[str, Any],
    run: Callable[[], dict[str, Any]],
) -> None:
    """One configuration: ``key`` plus what ``run()`` measured, recorded. A failure is
    recorded (with its traceback on stderr) and the run goes on; past the time limit the
    configuration is recorded as skipped."""
    if clock.spent():
        rec.add({**key, "skipped": f"time limit ({clock.limit / 60:g} min) reached"})
        return
    t0 = time.monotonic()
    try:
        row = {**key, **run()}
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        row = {**key, "error": f"{type(e).__name__}: {e}"}
        if getattr(model, ATTR, None) is not None:
            remove(model)
        dev.free()
    row["seconds"] = round(time.monotonic() - t0, 2)
    rec.add(row)


def line(row: dict[str, Any]) -> str:
    """One row as a printed line."""
    part = row.get("part", "")
    what = " ".join(
        str(row[k])
        for k in ("model", "context", "dtype", "label", "method", "budget", "r")
        if row.get(k) is not None
        and not (k == "method" and "label" in row)
        and not (k == "r" and "budget" in row)
    )
    if row.get("error") or row.get("skipped"):
        return f"{part} {what}: {row.get('error') or row.get('skipped')}"
    if part == "vision-speed":
        iqr = row.get("speedup_iqr") or (row["speedup"],) * 2
        return (
            f"{part} {what}: {row['speedup']:.2f}x (IQR {iqr[0]:.2f}-{iqr[1]:.2f}), "
            f"{row['img_s']:.0f} img/s (base {row['base_img_s']:.0f}), "
            f"tokens {row['tokens_in']:.0f} -> {row['tokens_out']:.0f}"
        )
    if part == "vision-fidelity":
        return f"{part} {what}: CLS cos {row['cos']:.4f} (p05 {row['cos_p05']:.4f})"
    if part == "llm-kv":
        peak = "" if row.get("peak_mb") is None else f", peak {row['peak_mb']:.0f} MB"
        return (
            f"{part} {what}: prefill {row['prefill_ms']:.1f} ms "
            f"(x{row['prefill_speedup']:.2f}), decode {row['decode_ms']:.2f} ms/token "
            f"(x{row['decode_speedup']:.2f}), KV kept {row['kv_kept']:.3f}{peak}"
        )
    return f"{part} {what}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report: a header, then per part its notes and one table."""
    dry = " (dry run: tiny models, not a measurement)" if meta.get("dry_run") else ""
    out = [
        f"# GPU benchmark{dry}\n",
        f"Device: {meta['machine']['device']}. Status: {meta.get('status')}, "
        f"{meta.get('seconds', 0):.0f} s.\n",
    ]
    for part in meta.get("parts_run", PARTS):
        mine = [_display(r) for r in rows if r.get("part") == part]
        out.append(f"## {TITLES[part]}\n")
        out.append(NOTES[part] + "\n")
        out += [f"**{n}**\n" for n in meta["notes"].get(part, [])]
        if mine:
            # stable: a model's rows together, then a dtype's (ToMe rows before autotune's)
            first = {k: list(dict.fromkeys(r.get(k) for r in mine)) for k in ("model", "dtype")}
            mine.sort(key=lambda r: tuple(first[k].index(r.get(k)) for k in first))
            out.append(report.table(mine, COLUMNS[part]))
    out.append(report.footer(meta))
    return "\n".join(out)
