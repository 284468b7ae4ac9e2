"""A reduction plan: an input size plus a method with a fixed per-layer schedule.

:func:`~tokenmerge.tune.autotune` returns one; it applies in one call (:meth:`Plan.apply`),
and saves to and loads from JSON (:meth:`Plan.save`, :meth:`Plan.load`) or a plain dict
(:meth:`Plan.state_dict`, :meth:`Plan.from_state_dict`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..api import apply, remove
from ..core.budget import PerLayer
from ..methods.base import Method, get_method

FORMAT = "tokenmerge.plan/1"


@dataclass(frozen=True)
class Plan:
    """An input size and a method with a fixed schedule, found for one model.

    Attributes:
        method: a registered method name (``tm.REGISTRY``).
        params: the method's other hyper-parameters (``prop_attn``, ...).
        schedule: tokens removed after each block, at ``input_size``. All zeros: the plan
            only downsamples.
        native_size: ``(H, W)`` of the images the plan was tuned on (and expects).
        input_size: ``(H, W)`` the images are resized to on entry; ``native_size`` for none.
        flops_ratio: analytic FLOPs against the unpatched model at ``native_size``.
        speedup: measured throughput ratio on the tuning machine (median of interleaved
            runs), ``None`` when the search had a FLOPs target only.
        fidelity: feature cosine against the unpatched model on held-out images:
            ``cosine`` (mean), ``cosine_p05``, ``n``; and the same for ``calibration``.
        search: what the search did: target, time spent, candidates tried, the best ones.
    """

    method: str
    params: dict[str, Any]
    schedule: tuple[int, ...]
    native_size: tuple[int, int]
    input_size: tuple[int, int]
    flops_ratio: float
    speedup: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", tuple(int(r) for r in self.schedule))
        object.__setattr__(self, "native_size", tuple(int(s) for s in self.native_size))
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        if any(r < 0 for r in self.schedule):
            raise ValueError(f"a plan's schedule must be >= 0 everywhere, got {self.schedule}")
        if not (0 < self.input_size[0] <= self.native_size[0]):
            raise ValueError(
                f"input_size {self.input_size} must be positive and at most native_size "
                f"{self.native_size}"
            )
        self.to_method()  # an unknown method or a bad parameter fails here, not at apply

    @property
    def input_scale(self) -> float | None:
        """Each side's fraction on entry (``None``: the images run at their own size)."""
        if self.input_size == self.native_size:
            return None
        return self.input_size[0] / self.native_size[0]

    @property
    def tokens_removed(self) -> int:
        return sum(self.schedule)

    def to_method(self) -> Method:
        """A fresh instance of the planned method with its schedule."""
        return get_method(self.method, r=PerLayer(self.schedule), **self.params)

    def apply(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` in place (``tm.remove(model)`` undoes it); returns ``model``.

        The model is then called as before, with images of ``native_size``: the patch resizes
        them to ``input_size`` on entry."""
        return apply(model, self.to_method(), input_scale=self.input_scale)

    @contextmanager
    def patched(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with plan.patched(model): ...`` applies on entry and removes on exit."""
        self.apply(model)
        try:
            yield model
        finally:
            remove(model)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (inverse: :meth:`from_state_dict`)."""
        d = asdict(self)
        d["schedule"], d["native_size"], d["input_size"] = (
            list(self.schedule),
            list(self.native_size),
            list(self.input_size),
        )
        return {"format": FORMAT, **d}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> Plan:
        """A plan from :meth:`state_dict`'s dict; refuses other formats and unknown keys."""
        if d.get("format") != FORMAT:
            raise ValueError(f"not a tokenmerge plan: format {d.get('format')!r}, want {FORMAT!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"format"})
        if unknown:
            raise ValueError(f"unknown plan fields {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k != "format"})

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON; returns the path."""
        p = Path(path)
        p.write_text(json.dumps(self.state_dict(), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`."""
        return cls.from_state_dict(json.loads(Path(path).read_text()))

    def describe(self) -> str:
        """One line: method, schedule, input size, FLOPs, measured speed, held-out fidelity."""
        size = "x".join(map(str, self.input_size))
        speed = f", {self.speedup:.2f}x measured" if self.speedup else ""
        fid = self.fidelity
        held = (
            f"; held-out cos {fid['cosine']:.4f} (p05 {fid['cosine_p05']:.4f}, n={fid['n']})"
            if "cosine" in fid
            else ""
        )
        sched = "/".join(map(str, self.schedule)) if any(self.schedule) else "none"
        return f"{self.method} r={sched} at {size} px: FLOPs {self.flops_ratio:.3f}{speed}{held}"
