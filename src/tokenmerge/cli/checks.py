"""The command line's checks, run before any model loads: model names, methods and their
parameters, images, budgets (and the warning when one leaves too few tokens), and the
one-line error type they raise."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..adapters import ReductionNotApplied, UnsupportedModelError
from ..core.budget import Budget, budget_label, parse_budget
from ..eval.zoo import AssetError
from ..zoo import CATALOG

#: where bench, bench-compile, bench-profile and tune write unless --out says otherwise
#: (relative to the working directory; git-ignored)
OUT = "tokenmerge-results"
#: a layer left with fewer tokens than this gets a warning
MIN_TOKENS = 8
#: the other model names every subcommand accepts
HUB_FORMS = "hf:NAME / timm:NAME (a hub id) or hf:PATH / timm:PATH (a local folder)"
#: the library's errors that mean bad input: one line on stderr, exit status 2
ERRORS = (ValueError, TypeError, FileNotFoundError, UnsupportedModelError, ReductionNotApplied,
          AssetError)  # fmt: skip


class CLIError(SystemExit):
    """A command-line error already reported on stderr: exit status 2; ``str()`` is the
    message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def warn(message: str) -> None:
    """One line on stderr."""
    print(f"tokenmerge: warning: {message}", file=sys.stderr)


def check_model(name: str, kind: str | None, command: str = "bench") -> str:
    """The kind (vision, text, llm, vlm) of model ``name``; refused, before anything loads, when it
    is neither a zoo name nor ``hf:``/``timm:``, or not of ``kind`` (``--kind``, or the kind
    the command takes)."""
    if name in CATALOG:
        own = CATALOG[name].kind
        if kind is not None and kind != own:
            raise ValueError(f"--model {name!r} is a {own} model; {command} needs a {kind} model")
        return own
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ("hf", "timm"):
        if not rest:
            raise ValueError(f"--model {name!r}: give a hub id or a folder after {prefix}:")
        if kind is None:
            raise ValueError(
                f"--model {name!r} is a hub model: pass --kind vision, text, llm, "
                "audio or diffusion"
            )
        if kind == "vlm":
            raise ValueError(
                f"--model {name!r}: hub VLMs are not benchmarked; the VLM bench runs on the zoo's "
                "tiny-llava"
            )
        if prefix == "timm" and kind != "vision":
            raise ValueError(f"--model {name!r}: timm models are vision models, not {kind}")
        return kind
    zoo = ", ".join(f"{n} ({m.kind})" for n, m in CATALOG.items())
    raise ValueError(f"unknown model {name!r}; zoo names: {zoo}; also accepted: {HUB_FORMS}")


def check_methods(names: Sequence[str], option: str = "--methods") -> list[str]:
    """``names`` if all are registered, else an error listing the registered methods."""
    from ..methods import REGISTRY

    for m in names:
        if m not in REGISTRY:
            raise ValueError(
                f"{option}: unknown method {m!r}; registered: {', '.join(sorted(REGISTRY))}"
            )
    return list(names)


#: the fields a bench sets from --budgets (ToMe-style ``r``; the LLM bench's compression
#: ``ratio``): never a --param, which would clash with the budget at run time
BUDGET_FIELDS = ("r", "ratio")


def method_fields(name: str) -> list[str]:
    """The hyper-parameters --param may set on registered method ``name``: its dataclass
    fields except the budget's (:data:`BUDGET_FIELDS`)."""
    from ..methods import REGISTRY

    return [
        f.name for f in dataclasses.fields(REGISTRY[name]) if f.init and f.name not in BUDGET_FIELDS
    ]


def check_image(path: str) -> Any:
    """The RGB image at ``path``; a missing or unreadable file is refused by name."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path!r}: no such file" + (" (a folder)" if p.is_dir() else ""))
    try:
        with Image.open(p) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path!r} is not an image PIL can read ({type(e).__name__})") from None


def parse_params(
    items: Sequence[str], settings: Mapping[str, Sequence[str]] | None = None
) -> dict[str, dict[str, object]]:
    """``tome.prop_attn=false`` -> ``{"tome": {"prop_attn": False}}``.

    METHOD must be registered and NAME one of its fields; ``settings`` adds pseudo-methods
    with their accepted names (the LLM bench's ``bench.*``)."""
    from ..methods import REGISTRY

    settings = settings or {}
    out: dict[str, dict[str, object]] = {}
    for item in items:
        try:
            key, raw = item.split("=", 1)
            method, name = key.split(".", 1)
        except ValueError:
            raise ValueError(f"--param expects METHOD.NAME=VALUE, got {item!r}") from None
        if method in settings:
            accepted = list(settings[method])
        elif method in REGISTRY:
            accepted = method_fields(method)
            if name in BUDGET_FIELDS and name in {
                f.name for f in dataclasses.fields(REGISTRY[method])
            }:
                raise ValueError(
                    f"--param {item}: {method}'s {name!r} is its budget; set it with --budgets "
                    f"(or --budgets-for {method}=...)"
                )
        else:
            known = ", ".join([*sorted(REGISTRY), *settings])
            raise ValueError(f"--param {item}: unknown method {method!r}; registered: {known}")
        if name not in accepted:
            raise ValueError(
                f"--param {item}: {method} has no parameter {name!r}; "
                f"accepted: {', '.join(accepted)}"
            )
        low = raw.lower()
        val: object = {"true": True, "false": False, "none": None}.get(low, raw)
        if val is raw:
            try:
                val = float(raw) if "." in raw else int(raw)
            except ValueError:
                val = raw
        out.setdefault(method, {})[name] = val
    for method, values in out.items():  # the values, checked as the method checks them
        if method in REGISTRY and method not in settings:
            try:
                REGISTRY[method](**values)
            except (ValueError, TypeError) as e:
                raise ValueError(f"--param {method}.*: {e}") from None
    return out


def parse_method_budgets(
    items: Sequence[str],
    parse: Callable[[str], Any] = parse_budget,
    accepted: Sequence[str] | None = None,
) -> dict[str, list]:
    """``pitome=keep:0.9,keep:0.8`` -> ``{"pitome": [KeepRatio(0.9), KeepRatio(0.8)]}``.

    ``parse`` reads one budget (the LLM bench's are compression factors); a METHOD that is not
    in ``accepted`` (when given: what the run benchmarks) is refused."""
    out = {}
    for item in items:
        method, sep, rest = item.partition("=")
        if not sep or not rest:
            raise SystemExit(f"--budgets-for expects METHOD=B1,B2,..., got {item!r}")
        if accepted is not None and method.strip() not in accepted:
            raise SystemExit(
                f"--budgets-for expects METHOD=B1,B2 with METHOD one of the benchmarked methods "
                f"({', '.join(accepted)}); got {item!r}"
            )
        out[method.strip()] = [parse(b) for b in rest.split(",")]
    return out


def zoo_tokens(model: str) -> tuple[int, int, Any] | None:
    """``(tokens, protected, cost model)`` of a zoo vision model at its input size, known
    without loading it (None for others: their counts are read after the first forward)."""
    if model != "dinov2-s":
        return None
    from ..core.flops import CostModel
    from ..eval.zoo import dinov2 as d

    grid = d._DINOV2_IMAGE_SIZE // d._DINOV2_PATCH
    cost = CostModel(depth=d._DINOV2_DEPTH, dim=d._DINOV2_DIM, mlp_dim=4 * d._DINOV2_DIM)
    return grid * grid + 1, 1, cost


def few_tokens(counts: Sequence[float]) -> tuple[int, float] | None:
    """``(layer, tokens)``: the first layer left with fewer than :data:`MIN_TOKENS` tokens,
    and the fewest any layer keeps (None when every layer keeps enough)."""
    for i, n in enumerate(counts):
        if n < MIN_TOKENS:
            return i, min(counts)
    return None


def warn_few_tokens(
    model: str,
    runs: Sequence[tuple[str, Budget]],
    params: Mapping[str, Mapping[str, object]] | None = None,
) -> None:
    """Before zoo model ``model`` loads: refuse a ``(method, budget)`` whose schedule cannot
    run on it (r too large), and warn (one line each) about one that leaves fewer than
    :data:`MIN_TOKENS` tokens in some layer."""
    from ..methods import REGISTRY

    geometry = zoo_tokens(model)
    if geometry is None:
        return
    n0, protected, cost = geometry
    for name, budget in runs:
        cls = REGISTRY.get(name)
        if cls is None or cls.dynamic or cls.site != "block":
            continue
        try:
            method = cls(r=budget, **(params or {}).get(name, {}))
        except (ValueError, TypeError):  # the run itself reports these
            continue
        try:
            counts = cost.tokens(n0, budget.schedule(n0, protected, cost, method.max_r))
        except ValueError as e:
            raise ValueError(f"{name} {budget_label(budget)} on {model}: {e}") from None
        low = few_tokens(counts)
        if low is not None:
            warn(few_tokens_message(name, budget, model, n0, *low))


def few_tokens_message(
    method: str, budget: Budget, model: str, n0: int, layer: int, n: float
) -> str:
    """The warning: ``n`` of ``n0`` tokens left, fewer than :data:`MIN_TOKENS` from ``layer``
    (0-based) on."""
    return (
        f"{method} {budget_label(budget)} leaves {n:.0f} of {model}'s {n0} tokens (fewer than "
        f"{MIN_TOKENS} from layer {layer + 1} on): too few for a reliable output"
    )


def positive(text: str) -> int:
    """An argparse type: an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value
