"""The life of a packaged bench's run (speech, VLM, diffusion): run under a progress bar,
save as JSON and Markdown, read back, and re-render with the current report code."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import report


def with_progress(total: int, run: Callable[[Callable[[int], None]], Any]) -> Any:
    """``run(tick)`` under a progress bar of ``total`` steps (on stderr)."""
    from tqdm import tqdm

    with tqdm(total=total, desc="bench", unit="step", file=sys.stderr) as bar:
        return run(bar.update)


def stem(name: str | None, model: str) -> str:
    """The files' stem: ``--name``, else the model's name with odd characters replaced."""
    return name or re.sub(r"[^A-Za-z0-9._-]", "_", model)


def meta_of(
    seed: int, config: dict[str, Any], result: dict[str, Any], saved: Sequence[str]
) -> dict[str, Any]:
    """The JSON's ``meta``: provenance, the configuration, and the result's ``saved`` parts."""
    meta = report.provenance(seed)
    meta["config"] = config
    for k in saved:
        meta[k] = result[k]
    return meta


def read(
    path: str | Path, cls: type, saved: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(config fields, result, meta)`` of a saved run: the configuration's entries that are
    fields of the dataclass ``cls`` (lists back to tuples), and the rows with the ``saved``
    parts."""
    data = json.loads(Path(path).read_text())
    meta, names = data["meta"], {f.name for f in dataclasses.fields(cls)}
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    conf = {k: v for k, v in conf.items() if k in names}
    return conf, {"rows": data["rows"], **{k: meta.get(k) for k in saved}}, meta


def rerender(
    path: str | Path,
    load: Callable[[Path], tuple[Any, dict[str, Any], dict[str, Any]]],
    markdown: Callable[[Any, dict[str, Any], dict[str, Any]], str],
    plot: Callable[[Any, dict[str, Any], Path], bool | None],
) -> list[str]:
    """Remake a saved run's Markdown and plot (``plot`` returns False when it draws nothing);
    returns the suffixes written."""
    path = Path(path)
    cfg, result, meta = load(path)
    path.with_suffix(".md").write_text(markdown(cfg, result, meta))
    if plot(cfg, result, path.with_suffix(".png")) is False:
        return [".md"]
    return [".md", ".png"]
