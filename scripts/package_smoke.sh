#!/usr/bin/env bash
# Packaging smoke test: build the sdist and wheel, check what they contain, then install the wheel
# with each user-facing extra (timm, transformers) into a clean virtual environment and run a
# tiny model through tm.apply / forward / tm.remove there.
#
#   scripts/package_smoke.sh            both extras
#   scripts/package_smoke.sh timm       one extra
#
# Everything goes to a temporary folder that is removed on exit; the only trace in the tree is
# src/tokenmerge.egg-info (git-ignored), which setuptools rewrites when it builds the sdist.
# torch comes from the pinned local wheels (-c constraints.txt): pip never resolves a newer one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EXTRAS=("$@")
[ ${#EXTRAS[@]} -gt 0 ] || EXTRAS=(timm transformers)
PY=.venv/bin/python
[ -x "$PY" ] || { echo "package_smoke: $PY missing; run scripts/setup.sh first" >&2; exit 2; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tokenmerge-pkg.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM  # run the EXIT trap on interruption too
start=$SECONDS
# run a pip command quietly; on failure show its output and stop
quiet() {
  local out
  out=$("$@" 2>&1) || { echo "$out" >&2; echo "package_smoke: failed: $*" >&2; return 1; }
  grep -v -E "^WARNING: Location" <<<"$out" || true
}
say() { echo "package_smoke [$((SECONDS - start)) s]: $*"; }

"$PY" -c "import build" 2>/dev/null || quiet "$PY" -m pip install -q -c constraints.txt build

say "building sdist and wheel"
"$PY" -m build --outdir "$TMP/dist" . >"$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; exit 1; }
SDIST=$(ls "$TMP"/dist/tokenmerge-*.tar.gz)
WHEEL=$(ls "$TMP"/dist/tokenmerge-*.whl)
say "built $(basename "$SDIST") and $(basename "$WHEEL")"

# What ships: the sdist carries the licence and README, the wheel the typed marker and licence
"$PY" - "$SDIST" "$WHEEL" <<'EOF'
import sys
import tarfile
import zipfile

sdist, wheel = sys.argv[1:]
with tarfile.open(sdist) as t:
    top = t.getnames()[0].split("/")[0]
    names = {n.partition("/")[2] for n in t.getnames()}
with zipfile.ZipFile(wheel) as z:
    wnames = set(z.namelist())
    meta = next(n for n in wnames if n.endswith(".dist-info/METADATA"))
    metadata = z.read(meta).decode()
want = ("LICENSE", "README.md", "pyproject.toml", "src/tokenmerge/py.typed")
problems = [f"sdist lacks {f}" for f in want if f not in names]
if "tokenmerge/py.typed" not in wnames:
    problems.append("wheel lacks tokenmerge/py.typed")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in wnames):
    problems.append("wheel lacks the licence file (.dist-info/licenses/LICENSE)")
if any(n.startswith(("tests/", "scripts/", "docs/")) for n in wnames):
    problems.append("wheel ships tests/, scripts/ or docs/")
for field in (
    "License-Expression: Apache-2.0",
    "Project-URL: Homepage, https://github.com/tokenmerge/tokenmerge",
    "Classifier: Typing :: Typed",
    "Description-Content-Type: text/markdown",
    "Provides-Extra: timm",
    "Provides-Extra: transformers",
):
    if field not in metadata:
        problems.append(f"wheel METADATA lacks {field!r}")
if problems:
    sys.exit("package_smoke: " + "; ".join(problems))
print(f"package_smoke: {top}: sdist {len(names)} files, wheel {len(wnames)} files: contents ok")
EOF

# The smoke test run inside each clean environment: argv[1] is the extra
cat >"$TMP/smoke.py" <<'EOF'
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

import tokenmerge as tm

extra = sys.argv[1]
root = Path(tm.__file__).parent
assert "site-packages" in root.parts, f"tokenmerge imported from {root}, not the installed wheel"
assert (root / "py.typed").is_file(), "py.typed is not in the installed package"
other = {"timm": "transformers", "transformers": "timm"}[extra]
assert importlib.util.find_spec(other) is None, f"{other} was installed with [{extra}]"
torch.manual_seed(0)


def check(label, model, run):
    model.eval()
    with torch.no_grad():
        ref = run(model)
        tm.apply(model, tm.ToMe(r=2))
        reduced = run(model)
        s = tm.summary(model)
        tm.remove(model)
        again = run(model)
    counts = s["tokens_per_layer"]
    assert counts[-1] < s["tokens_in"], f"{label}: no tokens merged: {s}"
    assert s["flops_ratio"] < 1.0, s
    assert torch.isfinite(reduced).all()
    assert torch.equal(ref, again), f"{label}: output after tm.remove differs from the original"
    print(f"  {label}: tokens {s['tokens_in']:.0f} -> {counts}, flops x{s['flops_ratio']:.2f}")


if extra == "timm":
    import timm
    from timm.models.vision_transformer import VisionTransformer

    x = torch.randn(2, 3, 32, 32)
    model = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=0
    )
    check(f"timm {timm.__version__} VisionTransformer", model, lambda m: m(x))
else:
    import transformers
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    warnings.simplefilter("ignore")
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    x = torch.randn(2, 3, 32, 32)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=4, **small))
    check(
        f"transformers {transformers.__version__} ViTModel",
        vit,
        lambda m: m(pixel_values=x).last_hidden_state[:, 0],
    )
    ids = torch.randint(5, 100, (2, 24))
    mask = torch.ones_like(ids)
    bert = BertModel(BertConfig(vocab_size=100, **small))
    check(
        f"transformers {transformers.__version__} BertModel",
        bert,
        lambda m: m(input_ids=ids, attention_mask=mask).pooler_output,
    )
print(f"package_smoke: [{extra}] ok (tokenmerge {tm.__version__}, torch {torch.__version__})")
EOF

# One environment with the pinned torch, copied as hard links (instant, and the copy's pip
# replaces files rather than writing into them) into a fresh environment per extra.
BASE=$("$PY" -c 'import sys; print(sys._base_executable)')
TORCH_VENV="$TMP/venv-torch"
say "clean venv with torch and torchvision from the pinned local wheels"
"$BASE" -m venv "$TORCH_VENV"
quiet "$TORCH_VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" torch torchvision
torch_v=$("$TORCH_VENV/bin/python" -c 'import torch; print(torch.__version__)')
want=$(sed -n 's/^torch==//p' "$ROOT/constraints.txt")
[ "${torch_v%%+*}" = "$want" ] || { echo "package_smoke: torch $torch_v, want $want" >&2; exit 1; }
for extra in "${EXTRAS[@]}"; do
  VENV="$TMP/venv-$extra"
  cp -al "$TORCH_VENV" "$VENV"
  say "[$extra] installing the wheel with [$extra]"
  quiet "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" "$WHEEL[$extra]"
  say "[$extra] running the smoke test"
  (cd "$TMP" && "$VENV/bin/python" smoke.py "$extra")
  rm -rf "$VENV"
done
say "done"
