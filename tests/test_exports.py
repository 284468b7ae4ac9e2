"""The public API: every registered method is a top-level class of ``tokenmerge``.

A new method file registers itself (``@register``); these tests fail until its class is also
imported by name in ``tokenmerge/methods/__init__.py`` and ``tokenmerge/__init__.py`` (static
imports, so that IDEs and type checkers see it) and listed in both ``__all__``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

import tokenmerge as tm
import tokenmerge.methods as tm_methods
from tokenmerge.methods import REGISTRY

METHODS = sorted(REGISTRY.items())
IDS = [name for name, _ in METHODS]


def _static_imports(module) -> set[str]:
    """Names that ``module``'s source binds with ``from ... import`` statements."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    return {
        a.asname or a.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for a in node.names
    }


def test_registry_is_not_empty():
    assert len(REGISTRY) >= 20
    assert {"tome", "pitome", "dtome", "snapkv", "fastv", "evit", "tofu", "kvzip"} <= set(REGISTRY)


@pytest.mark.parametrize(("name", "cls"), METHODS, ids=IDS)
def test_registered_method_is_exported(name, cls):
    assert getattr(tm, cls.__name__, None) is cls, f"tokenmerge.{cls.__name__} missing ({name})"
    assert getattr(tm_methods, cls.__name__, None) is cls
    assert cls.__name__ in tm.__all__
    assert cls.__name__ in tm_methods.__all__
    assert cls.__name__ in _static_imports(tm), "import it by name, not dynamically"
    assert cls.__name__ in _static_imports(tm_methods), "import it by name, not dynamically"


@pytest.mark.parametrize(("name", "cls"), METHODS, ids=IDS)
def test_registered_method_is_documented_and_typed(name, cls):
    doc = cls.__dict__.get("__doc__")
    # @dataclass writes "Name(field: type, ...)" when the class has no docstring of its own
    assert doc and not doc.startswith(f"{cls.__name__}("), f"{cls.__name__} has no docstring"
    assert len(inspect.cleandoc(doc)) > 20
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)  # every annotation resolves (no stale string names)
    for f in dataclasses.fields(cls):
        assert f.name in hints, f"{cls.__name__}.{f.name} has no annotation"
    assert cls.name == name


def _all_key(n: str) -> tuple[int, str]:
    """ruff's RUF022 order: SCREAMING_CASE, then CamelCase, then the rest, each sorted."""
    return (0 if n.isupper() else 1 if n[0].isupper() else 2, n)


def test_all_is_complete_and_sorted():
    for module in (tm, tm_methods):
        assert len(set(module.__all__)) == len(module.__all__)
        for n in module.__all__:
            assert hasattr(module, n), f"{module.__name__}.__all__ lists missing {n!r}"
        assert module.__all__ == sorted(module.__all__, key=_all_key)


@pytest.mark.parametrize(
    ("cls", "name", "params"),
    [
        (tm.PiToMe, "pitome", {"r": 4, "margin": 0.8, "alpha": 0.5}),
        (tm.SnapKV, "snapkv", {"ratio": 0.5, "window": 16, "kernel": 3, "per_head": False}),
        (tm.ToMe, "tome", {"r": (8, -0.5)}),
        (tm.FastV, "fastv", {"ratio": 0.5, "layer": 1}),
        (tm.EViT, "evit", {"r": 2}),
        (tm.KVzip, "kvzip", {"ratio": 0.75, "chunk": 64}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_class_equals_get_method(cls, name, params):
    direct = cls(**params)
    by_name = tm.get_method(name, **params)
    assert type(by_name) is cls
    assert direct == by_name
    assert dataclasses.asdict(direct) == dataclasses.asdict(by_name)


@pytest.mark.parametrize(("name", "cls"), METHODS, ids=IDS)
def test_default_construction_matches_get_method(name, cls):
    assert cls() == tm.get_method(name)


def test_get_method_unknown_name_lists_registered():
    with pytest.raises(ValueError, match=r"registered methods: .*pitome"):
        tm.get_method("no-such-method")
