"""``python -m tokenmerge.eval.gpu`` (``scripts/gpu_bench.sh``): arguments, checks, the run.

Every argument is checked before any model is built, and a bad one is refused (exit status
2) with the values accepted. Without CUDA the benchmark refuses to start, unless
``--dry-run`` asks for the tiny CPU smoke test of the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..report import provenance
from . import llm, vision
from .config import DTYPES, PARTS, Clock, Device, GpuBenchConfig, dry, full
from .report import Recorder

#: where a full run writes (relative to the working directory: the wrapper runs in the repo)
OUT = "docs/results/gpu"


class Interrupted(BaseException):
    """SIGTERM (``timeout``): stop, keep what was measured. Not an ``Exception``, so the
    per-configuration error handling lets it through."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_bench",
        description="The prepared GPU benchmark: ToMe and autotune on ViT-B/16 and ViT-L/16, "
        "ToMe fidelity on DINOv2-S, KV-cache methods on SmolLM2-135M and Qwen2.5-0.5B. "
        "About 5-6 minutes on one H100/H200.",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny models, same code, in seconds: float32 on the CPU, or float16 "
        "and bfloat16 with --device cuda (a first check on the GPU); writes to a "
        "temporary folder unless --out is given",
    )
    p.add_argument("--device", help="cuda (default), cuda:N, or cpu (with --dry-run only)")
    p.add_argument("--out", help=f"output folder (default {OUT}; dry run: a temporary one)")
    p.add_argument("--only", choices=PARTS, help="run one part only")
    p.add_argument(
        "--dtypes",
        help=f"vision dtypes, comma-separated, from {', '.join(DTYPES)} (default "
        "float16,bfloat16 on CUDA, float32 on the CPU; on the CPU, half-precision "
        "autotune plans that shrink the input fail: torch has no half antialiased "
        "resize there)",
    )
    p.add_argument("--contexts", help="LLM context lengths in tokens (default 8192,32768)")
    p.add_argument("--batch-size", type=int, help="vision batch size (default 256)")
    p.add_argument("--autotune-time", type=float, help="seconds per autotune search (default 8)")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="start no new configuration after this many minutes (default 7.5; "
        "0: no limit); the rest is recorded as skipped",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def _list(p: argparse.ArgumentParser, flag: str, text: str, accepted: Sequence[str]) -> tuple:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in accepted]
    if bad or not values:
        p.error(
            f"{flag}: {', '.join(bad) or repr(text)} not accepted; accepted: {', '.join(accepted)}"
        )
    return values


def _ints(p: argparse.ArgumentParser, flag: str, text: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < minimum:
        p.error(
            f"{flag} takes whole numbers >= {minimum} separated by commas "
            f"(e.g. 8192,32768); got {text!r}"
        )
    return values


def parse(argv: Sequence[str] | None = None) -> tuple[GpuBenchConfig, str | None]:
    """The run's :class:`~.config.GpuBenchConfig` from the arguments; exits (status 2,
    naming what is accepted) on bad ones, and without CUDA unless ``--dry-run``."""
    p = parser()
    a = p.parse_args(argv)
    dtypes = _list(p, "--dtypes", a.dtypes, DTYPES) if a.dtypes is not None else None
    contexts = _ints(p, "--contexts", a.contexts, 64) if a.contexts is not None else None
    for flag, v in (("--batch-size", a.batch_size), ("--autotune-time", a.autotune_time)):
        if v is not None and v <= 0:
            p.error(f"{flag} must be positive, got {v}")
    if a.max_minutes is not None and a.max_minutes < 0:
        p.error(f"--max-minutes must be >= 0 (0: no limit), got {a.max_minutes}")
    device = a.device or ("cpu" if a.dry_run else "cuda")
    kind = device.split(":", 1)[0]
    if kind not in ("cuda", "cpu") or (kind == "cpu" and device != "cpu"):
        p.error(f"--device: {device!r} not accepted; accepted: cuda, cuda:N, cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        p.error(
            "no CUDA device here: the GPU benchmark needs one. `--dry-run` runs the same "
            "code on tiny models on the CPU."
        )
    if kind == "cpu" and not a.dry_run:
        p.error("the full benchmark needs a CUDA device; --device cpu is for --dry-run only")
    cfg = dry(device) if a.dry_run else full(device)
    kw: dict[str, Any] = {"seed": a.seed}
    if a.only:
        kw["parts"] = (a.only,)
    if dtypes:
        kw["dtypes"] = dtypes
    if contexts:
        kw["contexts"] = contexts
    if a.batch_size:
        kw["batch_size"] = a.batch_size
    if a.autotune_time:
        kw["autotune_time"] = a.autotune_time
    if a.max_minutes is not None:
        kw["max_minutes"] = a.max_minutes or None
    return cfg.replace(**kw), a.out


def run(cfg: GpuBenchConfig, rec: Recorder) -> None:
    """The parts in the order that keeps the most per minute if time runs short: ToMe speed,
    DINOv2-S fidelity, the LLMs, then the autotune searches (the most elastic). A phase that
    fails outside its configurations (a model that cannot be built) is recorded as one error
    row, and the next phase runs."""
    dev = Device(cfg.device)
    phases = []
    if "vision" in cfg.parts:
        phases += [(vision.SPEED, vision.speed), (vision.FIDELITY, vision.fidelity)]
    if "llm" in cfg.parts:
        phases.append((llm.PART, llm.run))
    if "vision" in cfg.parts:
        phases.append((vision.SPEED, vision.autotuned))
    for part, phase in phases:
        try:
            phase(cfg, dev, rec.clock, rec)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            rec.add({"part": part, "phase": phase.__name__, "error": f"{type(e).__name__}: {e}"})
            dev.free()


def _meta(cfg: GpuBenchConfig, argv: Sequence[str] | None) -> dict[str, Any]:
    meta = provenance(cfg.seed, argv=None if argv is None else ["gpu_bench", *argv])
    dev = Device(cfg.device)
    meta["machine"]["device"] = dev.describe()
    meta["versions"]["cuda"] = torch.version.cuda
    if dev.cuda:
        meta["gpu"] = {
            "name": torch.cuda.get_device_name(dev.torch),
            "capability": list(torch.cuda.get_device_capability(dev.torch)),
            "memory_gb": round(torch.cuda.get_device_properties(dev.torch).total_memory / 2**30, 1),
        }
    meta["dry_run"] = cfg.dry_run
    meta["dtypes"] = {"vision": list(cfg.dtypes), "llm": cfg.llm_dtype}
    meta["config"] = dataclasses.asdict(cfg)
    parts = {"vision": ["vision-speed", "vision-fidelity"], "llm": ["llm-kv"]}
    meta["parts_run"] = [p for part in cfg.parts for p in parts[part]]
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every configuration ran, 1 when some failed (recorded in
    the report), 143 when stopped by SIGTERM (what was measured is saved)."""
    cfg, out = parse(argv)
    threads = torch.get_num_threads()
    if cfg.dry_run and cfg.device == "cpu":
        # tiny models gain nothing from a second thread, and a thread that waits for a busy
        # core costs milliseconds per operator: one keeps the smoke test at seconds
        torch.set_num_threads(1)
    try:
        return _main(cfg, out, argv)
    finally:
        torch.set_num_threads(threads)


def _main(cfg: GpuBenchConfig, out: str | None, argv: Sequence[str] | None) -> int:
    if out is None:
        out = tempfile.mkdtemp(prefix="tokenmerge-gpu-dry-run-") if cfg.dry_run else OUT
    stem = "gpu-bench" + ("" if len(cfg.parts) > 1 else f"-{cfg.parts[0]}")
    clock = Clock(cfg.max_minutes)
    rec = Recorder(Path(out), stem, _meta(cfg, argv), clock)
    print(
        f"gpu_bench: {'dry run, ' if cfg.dry_run else ''}{rec.meta['machine']['device']}, "
        f"parts {', '.join(cfg.parts)}; results go to {out}/",
        flush=True,
    )

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, stop) if main_thread else None
    status, code = "failed", 1
    try:
        run(cfg, rec)
        status, code = "complete", 0
        if rec.errors:
            status, code = f"complete, {len(rec.errors)} configuration(s) failed", 1
        if clock.spent():
            status += f"; stopped starting configurations at {cfg.max_minutes:g} min"
    except (Interrupted, KeyboardInterrupt) as e:
        status = f"interrupted ({e or 'keyboard'})"
        code = 143 if isinstance(e, Interrupted) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
        rec.meta["status"] = status
        rec.save()
    js, md = rec.paths
    print("\n" + md.read_text())
    print(f"gpu_bench: {status} in {clock.elapsed():.0f} s; wrote {js} and {md}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
