"""What differs between ``transformers`` versions, in one place.

transformers 5.24 renamed the cache argument of every model, decoder layer and attention
forward from ``past_key_values`` to ``cache`` (the old name is still accepted, with a
``FutureWarning``, until 5.40) and model outputs carry ``.cache`` (``.past_key_values`` is a
deprecated alias). The adapter therefore reads the argument names of the modules it patches
from their signatures, once at patch time (:class:`Signature`), reads a cache passed under
either name, and writes the canonical one only, never both. Outputs are read through
:func:`cache_of`; callers pass a cache with :func:`cache_kw`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import transformers
from torch import nn

from ..base import UnsupportedModelError

#: the cache argument's names, newest first
CACHE_NAMES = ("cache", "past_key_values")

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class Signature:
    """The arguments of one module class's ``forward``.

    Attributes:
        owner: the class name (for messages).
        positional: names of the parameters that may be passed by position (``self`` excluded).
        names: every named parameter.
        cache: the canonical name of its cache argument (``None``: it takes none).
    """

    owner: str
    positional: tuple[str, ...]
    names: frozenset[str]
    cache: str | None

    @classmethod
    def of(cls, module: nn.Module, required: Iterable[str] = (), cache: bool = True) -> Signature:
        """``module``'s forward signature; refuses one without the ``required`` arguments (or,
        with ``cache=True``, without a cache argument) by name."""
        return _signature(type(module), tuple(required), cache)

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """``kwargs`` with the positional ``args`` moved in under their names."""
        if not args:
            return kwargs
        if len(args) > len(self.positional):
            raise TypeError(
                f"{self.owner}.forward takes {len(self.positional)} positional arguments, "
                f"got {len(args)}"
            )
        out = dict(zip(self.positional, args, strict=False))
        for k, v in kwargs.items():
            if k in out:
                raise TypeError(f"{self.owner}.forward got multiple values for argument {k!r}")
            out[k] = v
        return out

    def take_cache(self, kwargs: dict) -> Any:
        """The cache passed in ``kwargs`` under either name; removes every name but the
        canonical one (which is kept only if some name was given)."""
        given = [(n, kwargs.pop(n)) for n in CACHE_NAMES if n in kwargs]
        caches = [v for _, v in given if v is not None]
        if len(caches) > 1 and caches[0] is not caches[1]:
            raise ValueError(
                f"{self.owner}: two different caches were passed, as {given[0][0]}= and "
                f"{given[1][0]}=; pass one ({self.cache}=)"
            )
        cache = caches[0] if caches else None
        if given and self.cache is not None:
            kwargs[self.cache] = cache
        return cache


@cache
def _signature(cls: type, required: tuple[str, ...], need_cache: bool) -> Signature:
    try:
        sig = inspect.signature(cls.forward)  # follows functools.wraps (transformers' decorators)
    except (TypeError, ValueError) as e:  # pragma: no cover - builtin or odd forwards
        raise UnsupportedModelError(f"cannot read the signature of {cls.__name__}.forward") from e
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    names = frozenset(p.name for p in params)
    found = next((n for n in CACHE_NAMES if n in names), None)
    missing = [n for n in required if n not in names]
    if need_cache and found is None:
        missing.append(" or ".join(f"{n}=" for n in CACHE_NAMES))
    if missing:
        raise UnsupportedModelError(
            f"{cls.__name__}.forward takes no {', '.join(missing)} argument (transformers "
            f"{transformers.__version__}); the hf-decoder adapter does not know this version's "
            "interface and will not patch the model"
        )
    positional = tuple(p.name for p in params if p.kind in _POSITIONAL)
    return Signature(cls.__name__, positional, names, found)


def cache_of(output: Any) -> Any:
    """The cache a model's output carries (``.cache`` from transformers 5.24 on,
    ``.past_key_values`` before), or ``None`` (no cache, or a plain tuple output)."""
    if isinstance(output, Mapping):  # ModelOutput: its keys are the fields that are set
        keys = output.keys()
        for name in CACHE_NAMES:
            if name in keys:
                return output[name]
    return None


def cache_arg(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes its cache."""
    name = Signature.of(model).cache
    assert name is not None  # Signature.of refuses a forward without one
    return name


def cache_kw(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass ``cache`` to ``model`` under its own argument name:
    ``model(ids, **cache_kw(model, cache))`` works on every supported transformers version."""
    return {cache_arg(model): cache}
