"""Conversions cached on disk: a folder written once, atomically, with a manifest of the source's
sha256 and every file's sha256, so a later load reads it back only when it is intact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .sources import _atomic_write_json, sha256_file

MANIFEST = "tokenmerge_manifest.json"


def cache_is_valid(folder: Path, source_sha: str) -> bool:
    """True when `folder` holds a complete conversion of `source_sha` whose files are intact."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if record.get("source_sha256") != source_sha:
        return False
    files: dict[str, str] = record.get("files", {})
    return bool(files) and all(
        (folder / rel).is_file() and sha256_file(folder / rel) == sha for rel, sha in files.items()
    )


def write_conversion(folder: Path, source_sha: str, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a fresh temporary folder next to `folder`, record the manifest
    and move it into place (another process that finished first wins)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache may be shared
    try:
        write(tmp)
        files = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _atomic_write_json(tmp / MANIFEST, {"source_sha256": source_sha, "files": files})
        if folder.exists():
            if cache_is_valid(folder, source_sha):
                return  # another process finished the same conversion first
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
