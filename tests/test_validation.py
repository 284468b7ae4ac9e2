"""Inputs and budgets: no silent failures (issue 9).

Every integral type is an int wherever an int is expected, every real type a float wherever a
float is, and both are normalised to plain Python values when the object is built. Everything
else (strings, bools, NaN, infinities, floats for ints, negative values, out-of-range ratios,
tuples of the wrong length, per-layer lists of the wrong length) is refused with a message that
names the parameter, the bad value and the accepted forms. Parametrised over every registered
method and every budget kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmerge as tm
from tokenmerge.core.budget import (
    Constant,
    Inflection,
    KeepRatio,
    PerLayer,
    TargetFlops,
    TargetTokens,
    as_budget,
    parse_budget,
)
from tokenmerge.methods import REGISTRY, get_method
from tokenmerge.methods.base import BudgetLike
from tokenmerge.methods.decoder import DecoderMethod
from tokenmerge.methods.dtome import DToMe
from tokenmerge.methods.kv import KVMethod
from tokenmerge.methods.m3 import M3, PoolAt
from tokenmerge.methods.projector import ProjectorMethod

SETTINGS = settings(max_examples=25, deadline=None)

# every integral type an int may arrive as (value -> that type)
INT_TYPES = {
    "int": int,
    "np.int64": np.int64,
    "np.int32": np.int32,
    "np.int16": np.int16,
    "np.array-0d": lambda v: np.array(v),
    "tensor-int64": lambda v: torch.tensor(v),
    "tensor-int32": lambda v: torch.tensor(v, dtype=torch.int32),
}
# every real type a float may arrive as; float32 ones are compared with the float32 value
FLOAT_TYPES = {
    "float": float,
    "np.float64": np.float64,
    "np.float32": np.float32,
    "np.array-0d": lambda v: np.array(v),
    "tensor-float64": lambda v: torch.tensor(v, dtype=torch.float64),
    "tensor-float32": lambda v: torch.tensor(v, dtype=torch.float32),
}
FLOAT64_TYPES = {k: v for k, v in FLOAT_TYPES.items() if "32" not in k}

ints = st.integers(0, 30000)  # fits every type above (int16 included)
int_types = st.sampled_from(sorted(INT_TYPES))
float_types = st.sampled_from(sorted(FLOAT_TYPES))


def plain_float(kind: str, v: float) -> float:
    return float(np.float32(v)) if "32" in kind else float(v)


def plain_types(obj) -> bool:
    """Every scalar inside ``obj`` (a dataclass, tuple or list) is a plain int/float/bool/str."""
    if dataclasses.is_dataclass(obj):
        return all(
            plain_types(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not isinstance(getattr(obj, f.name), torch.Tensor)
        )
    if isinstance(obj, (list, tuple)):
        return all(plain_types(x) for x in obj)
    if isinstance(obj, dict):  # a wrapper's parameters for the method it wraps
        return all(type(k) is str and plain_types(v) for k, v in obj.items())
    return obj is None or type(obj) in (int, float, bool, str)


def refused(match: str, *names: str):
    """``pytest.raises`` for a TypeError or ValueError whose message holds every one of
    ``names`` (the parameter, the value) and matches ``match`` (the accepted forms)."""
    return _Refused(match, names)


class _Refused:
    def __init__(self, match: str, names: tuple[str, ...]):
        self.ctx = pytest.raises((TypeError, ValueError), match=match)
        self.names = names

    def __enter__(self):
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        out = self.ctx.__exit__(*exc)
        msg = str(self.info.value)
        for n in self.names:
            assert n in msg, f"{n!r} not named in: {msg}"
        return out


# ============================================================================ budgets: accepted


@SETTINGS
@given(r=ints, kind=int_types)
def test_constant_r_any_integral_type(r, kind):
    v = INT_TYPES[kind](r)
    for built, want in [
        (Constant(v), Constant(r)),
        (as_budget(v), Constant(r)),
        (tm.ToMe(r=v), tm.ToMe(r=r)),
        (TargetTokens(INT_TYPES[kind](r + 1)), TargetTokens(r + 1)),
    ]:
        assert built == want and repr(built) == repr(want) and plain_types(built)
    assert hash(Constant(v)) == hash(Constant(r))
    assert json.dumps(dataclasses.asdict(tm.ToMe(r=v))) == json.dumps(
        dataclasses.asdict(tm.ToMe(r=r))
    )


@SETTINGS
@given(r=ints, i=st.floats(-1.0, 1.0), ik=int_types, fk=float_types)
def test_inflection_any_numeric_types(r, i, ik, fk):
    got = (INT_TYPES[ik](r), FLOAT_TYPES[fk](i))
    inflection = plain_float(fk, i)
    built, want = tm.ToMe(r=got), tm.ToMe(r=(r, inflection))
    assert built == want and repr(built) == repr(want) and plain_types(built)
    assert as_budget(got) == Inflection(r, inflection)
    assert Inflection(*got) == Inflection(r, inflection)
    assert type(tm.ToMe(r=(r, -1)).r[1]) is float  # an int inflection becomes a float


@SETTINGS
@given(rs=st.lists(st.tuples(ints, int_types), min_size=0, max_size=12))
def test_per_layer_list_of_any_integral_types(rs):
    plain = [r for r, _ in rs]
    got = [INT_TYPES[k](r) for r, k in rs]
    built = tm.ToMe(r=got)
    assert built == tm.ToMe(r=plain) and repr(built) == repr(tm.ToMe(r=plain))
    assert plain_types(built)
    assert as_budget(got) == PerLayer(tuple(plain)) == PerLayer(got)
    assert hash(PerLayer(got)) == hash(PerLayer(tuple(plain)))  # PerLayer([..]) is hashable
    if plain:  # 1-d arrays and tensors are per-layer lists too
        assert tm.ToMe(r=np.array(plain)) == tm.ToMe(r=plain)
        assert tm.ToMe(r=torch.tensor(plain)) == tm.ToMe(r=plain)


@SETTINGS
@given(x=st.floats(1e-6, 1.0), kind=float_types)
def test_ratio_budgets_any_real_type(x, kind):
    v, want = FLOAT_TYPES[kind](x), plain_float(kind, x)
    for cls in (KeepRatio, TargetFlops):
        built = cls(v)
        assert built == cls(want) and repr(built) == repr(cls(want)) and plain_types(built)
        assert tm.ToMe(r=built) == tm.ToMe(r=cls(want))
    assert KeepRatio(1) == KeepRatio(1.0) and type(KeepRatio(1).ratio) is float


# ============================================================================ budgets: refused

R_FORMS = r"accepted budgets: an int r .*\(r, inflection\).*per-layer list.*KeepRatio"

BAD_R = [
    pytest.param("8", "unsupported budget", id="str"),
    pytest.param(b"8", "unsupported budget", id="bytes"),
    pytest.param(2.5, "non-negative int", id="fraction"),
    pytest.param(8.0, "pass 8", id="int-valued-float"),
    pytest.param(np.float64(8.0), "pass 8", id="np-float"),
    pytest.param(torch.tensor(8.0), "pass 8", id="float-tensor"),
    pytest.param(0.5, r"tm\.KeepRatio\(0\.5\)", id="keep-ratio-mistake"),
    pytest.param(float("nan"), "non-negative int", id="nan"),
    pytest.param(float("inf"), "non-negative int", id="inf"),
    pytest.param(True, "must be an int", id="bool"),
    pytest.param(np.bool_(False), "must be an int", id="np-bool"),
    pytest.param(torch.tensor(True), "must be an int", id="bool-tensor"),
    pytest.param(-1, "non-negative int", id="negative"),
    pytest.param(np.int64(-3), "non-negative int", id="np-negative"),
    pytest.param(None, "unsupported budget", id="none"),
    pytest.param({8}, "unsupported budget", id="set"),
    pytest.param(torch.tensor([[8]]), "unsupported budget", id="2d-tensor"),
    pytest.param((8,), "has 1", id="tuple-1"),
    pytest.param((8, -1.0, 0), r"has 3.* list \(\[8, -1\.0, 0\]\)", id="tuple-3"),
    pytest.param((), "has 0", id="tuple-0"),
    pytest.param((8.7, 0.0), "non-negative int", id="tuple-float-r"),
    pytest.param(("8", -1.0), "non-negative int", id="tuple-str-r"),
    pytest.param((True, -1.0), "non-negative int", id="tuple-bool-r"),
    pytest.param((-2, -1.0), "non-negative int", id="tuple-negative-r"),
    pytest.param([1, 2.5], "non-negative int", id="list-float"),
    pytest.param([1, "2"], "non-negative int", id="list-str"),
    pytest.param([1, True], "non-negative int", id="list-bool"),
    pytest.param([1, -2], "non-negative int", id="list-negative"),
    pytest.param([1, float("nan")], "non-negative int", id="list-nan"),
    pytest.param([[1, 2]], "non-negative int", id="list-nested"),
]


@pytest.mark.parametrize("bad, match", BAD_R)
@pytest.mark.parametrize("build", [tm.ToMe, as_budget], ids=["ToMe", "as_budget"])
def test_bad_r_is_refused_with_the_accepted_forms(build, bad, match):
    with refused(match):
        build(bad) if build is as_budget else build(r=bad)
    with refused(R_FORMS):
        build(bad) if build is as_budget else build(r=bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        pytest.param((8, "x"), r"inflection must be a number", id="str"),
        pytest.param((8, True), r"inflection must be a number", id="bool"),
        pytest.param((8, float("nan")), r"inflection must be a finite number", id="nan"),
        pytest.param((8, float("inf")), r"inflection must be a finite number", id="inf"),
        pytest.param((8, 2.0), r"inflection must lie in \[-1, 1\], got 2\.0", id="range"),
        pytest.param((8, None), r"inflection must be a number", id="none"),
    ],
)
def test_bad_inflection_is_refused(bad, match):
    for build in (lambda: tm.ToMe(r=bad), lambda: as_budget(bad), lambda: Inflection(*bad)):
        with refused(match):
            build()


CTORS = {
    "Constant": (Constant, "r", r"non-negative int \(a Python int"),
    "TargetTokens": (TargetTokens, "TargetTokens.tokens", r"int >= 1 \(a Python int"),
    "KeepRatio": (KeepRatio, "KeepRatio.ratio", r"number \(a Python int or float"),
    "TargetFlops": (TargetFlops, "TargetFlops.ratio", r"number \(a Python int or float"),
}
BAD_SCALARS = {
    "Constant": ["8", 2.5, 8.0, True, float("nan"), None, torch.tensor(8.0), [8]],
    "TargetTokens": ["64", 64.0, 6.5, True, np.bool_(True), float("inf"), None, [64]],
    "KeepRatio": ["0.5", True, np.bool_(True), None, [0.5], torch.tensor([0.5])],
    "TargetFlops": ["0.5", True, None, (0.5,)],
}


@pytest.mark.parametrize(
    "kind, bad",
    [pytest.param(k, b, id=f"{k}-{b!r}") for k, bads in BAD_SCALARS.items() for b in bads],
)
def test_budget_kinds_refuse_bad_types(kind, bad):
    cls, name, forms = CTORS[kind]
    with refused(forms, name, repr(bad)):
        cls(bad)


@pytest.mark.parametrize(
    "build, match",
    [
        pytest.param(lambda: TargetTokens(0), r"TargetTokens\.tokens must be an int >= 1", id="t0"),
        pytest.param(lambda: TargetTokens(np.int64(-5)), r"int >= 1, got -5", id="t-neg"),
        pytest.param(lambda: Constant(np.int32(-1)), "r must be a non-negative int", id="c-neg"),
        pytest.param(lambda: KeepRatio(0), r"KeepRatio\.ratio must lie in \(0, 1\]", id="k0"),
        pytest.param(lambda: KeepRatio(np.float32(1.5)), r"\(0, 1\], got 1\.5", id="k>1"),
        pytest.param(lambda: KeepRatio(-0.1), r"\(0, 1\], got -0\.1", id="k<0"),
        pytest.param(lambda: KeepRatio(float("nan")), r"finite number in \(0, 1\]", id="knan"),
        pytest.param(lambda: KeepRatio(float("inf")), r"finite number in \(0, 1\]", id="kinf"),
        pytest.param(
            lambda: TargetFlops(torch.tensor(1.5)), r"TargetFlops\.ratio must lie", id="f"
        ),
        pytest.param(lambda: TargetFlops(float("-inf")), r"finite number", id="f-inf"),
        pytest.param(lambda: PerLayer((1, -1)), r"r\[1\] must be a non-negative int", id="pl"),
        pytest.param(lambda: PerLayer(8), r"one int per layer", id="pl-scalar"),
        pytest.param(lambda: PerLayer("88"), r"one int per layer", id="pl-str"),
    ],
)
def test_budget_values_out_of_range(build, match):
    with refused(match):
        build()


def test_kind_messages_say_what_the_value_means():
    with pytest.raises(ValueError, match=r"fraction of its unprotected tokens each layer keeps"):
        KeepRatio(2.0)
    with pytest.raises(ValueError, match=r"tokens per sample to reach after the last layer"):
        TargetTokens(0)
    with pytest.raises(ValueError, match=r"FLOPs of the reduced model over the full one"):
        TargetFlops(0.0)
    with pytest.raises(TypeError, match=r"parse_budget\('8'\)"):
        tm.ToMe(r="8")


# ============================================================================ parse_budget (CLI)


@pytest.mark.parametrize(
    "text, want",
    [
        ("16", Constant(16)),
        (" 8 ", Constant(8)),
        ("16:-1", Inflection(16, -1.0)),
        ("16:0.5", Inflection(16, 0.5)),
        ("list:8/8/16", PerLayer((8, 8, 16))),
        ("keep:0.9", KeepRatio(0.9)),
        ("tokens:64", TargetTokens(64)),
        ("flops:0.5", TargetFlops(0.5)),
        ("flops:1", TargetFlops(1.0)),
    ],
)
def test_parse_budget_keeps_working(text, want):
    got = parse_budget(text)
    assert got == want and repr(got) == repr(want) and plain_types(got)


@pytest.mark.parametrize(
    "text, why",
    [
        ("abc", "invalid literal"),
        ("2.5", "invalid literal"),
        ("-1", "non-negative int"),
        ("16:2", r"inflection must lie in \[-1, 1\]"),
        ("16:nan", "inflection must be a finite number"),
        ("-4:0", "non-negative int"),
        ("list:8/x", "invalid literal"),
        ("list:8/-1", r"r\[1\] must be a non-negative int"),
        ("keep:0", r"KeepRatio\.ratio must lie in \(0, 1\]"),
        ("keep:nan", "KeepRatio.ratio must be a finite number"),
        ("keep:inf", "KeepRatio.ratio must be a finite number"),
        ("tokens:0", r"TargetTokens\.tokens must be an int >= 1"),
        ("tokens:6.5", "invalid literal"),
        ("flops:1.5", r"TargetFlops\.ratio must lie in"),
    ],
)
def test_parse_budget_messages(text, why):
    forms = r"accepted forms: 16, 16:-1, list:8/8/16, keep:0\.9, tokens:64, flops:0\.5"
    with pytest.raises(ValueError, match=rf"cannot parse budget {text!r} \(.*{why}.*\); {forms}"):
        parse_budget(text)


# ============================================================================ every method's fields


def _kind(hint) -> str | None:
    """The class of an annotation, for the tests: int, float, bool, literal, tuple, budget."""
    if hint == BudgetLike:
        return "budget"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0]) if len(rest) == 1 else None
    if origin is typing.Literal:
        return "literal"
    if origin is tuple:
        return "seq" if len(args) == 2 and args[1] is Ellipsis else "tuple"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(hint)


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _fields(*kinds: str):
    out = []
    for name, cls in sorted(REGISTRY.items()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and _kind(hints[f.name]) in kinds:
                out.append(pytest.param(cls, f.name, hints[f.name], id=f"{name}.{f.name}"))
    return out


def _valid(cls, field: str, kind: str):
    """A base instance (``example(4)``) and a valid plain value for ``field``."""
    base = cls.example(4)
    v = getattr(base, field)
    if v is None:
        v = {"int": 1, "float": 0.5, "bool": True}[kind]
    return base, v


def test_every_method_builds_with_defaults_and_examples():
    assert len(REGISTRY) >= 19
    for cls in REGISTRY.values():
        for m in (cls(), cls.example(0), cls.example(4)):
            assert plain_types(m), m
            assert dataclasses.replace(m) == m  # rebuilding from its own values is stable


def test_every_field_has_a_checked_annotation():
    """A new method's fields are covered by the generic check: only the documented rich
    unions (DToMe's thresholds, a KV ratio) and AdaKV's parameters for its scorer (checked
    by building that scorer) are left to the method itself."""
    left = {
        (cls.__name__, f.name)
        for cls in REGISTRY.values()
        for f in dataclasses.fields(cls)
        if f.init and _kind(typing.get_type_hints(cls)[f.name]) is None
    }
    kv = {(c.__name__, "ratio") for c in REGISTRY.values() if issubclass(c, KVMethod)}
    assert left == {("DToMe", "thresholds"), ("AdaKV", "scorer_params")} | kv
    with pytest.raises(ValueError, match="window"):
        get_method("adakv", ratio=0.5, scorer_params={"window": 0})
    with pytest.raises(TypeError, match="window"):
        get_method("adakv", ratio=0.5, scorer_params={"window": "4"})


@pytest.mark.parametrize("cls, field, hint", _fields("seq"))
def test_int_sequence_fields(cls, field, hint):
    base = cls.example(4)
    for bad, match in (("ab", "must be a tuple"), (5, "must be a tuple"), ((1, 2.0), r"\[1\]")):
        with refused(match, f"{cls.__name__}.{field}"):
            dataclasses.replace(base, **{field: bad})
    built = dataclasses.replace(base, **{field: [np.int64(3), 4]})
    assert getattr(built, field) == (3, 4) and plain_types(built)


@pytest.mark.parametrize("cls, field, hint", _fields("int"))
@pytest.mark.parametrize("kind", sorted(INT_TYPES))
def test_int_fields_accept_every_integral_type(cls, field, hint, kind):
    base, v = _valid(cls, field, "int")
    built = dataclasses.replace(base, **{field: INT_TYPES[kind](v)})
    want = dataclasses.replace(base, **{field: v})
    assert built == want and repr(built) == repr(want)
    assert type(getattr(built, field)) is int


@pytest.mark.parametrize("cls, field, hint", _fields("float"))
@pytest.mark.parametrize("kind", [*sorted(FLOAT64_TYPES), "int"])
def test_float_fields_accept_every_real_type(cls, field, hint, kind):
    base, v = _valid(cls, field, "float")
    if kind == "int":
        if not float(v).is_integer():
            return  # no int form of this default (alpha=1.0 has one: 1)
        value = int(v)
    else:
        value = FLOAT_TYPES[kind](v)
    built = dataclasses.replace(base, **{field: value})
    want = dataclasses.replace(base, **{field: float(v)})
    assert built == want and repr(built) == repr(want)
    assert type(getattr(built, field)) is float


@pytest.mark.parametrize("cls, field, hint", _fields("float"))
def test_float_fields_accept_float32(cls, field, hint):
    base, v = _valid(cls, field, "float")
    built = dataclasses.replace(base, **{field: np.float32(v)})
    assert getattr(built, field) == float(np.float32(v))
    assert type(getattr(built, field)) is float


@pytest.mark.parametrize("cls, field, hint", _fields("bool"))
@pytest.mark.parametrize("value", [True, False, np.bool_(True), torch.tensor(False)], ids=repr)
def test_bool_fields_accept_bool_types(cls, field, hint, value):
    base, _ = _valid(cls, field, "bool")
    if issubclass(cls, (KVMethod, tm.ToMeSD)) and field == "prop_attn" and bool(value):
        return  # KV methods and ToMeSD refuse proportional attention (their own rule)
    if cls is tm.ToMeSD:  # it must merge around at least one sub-layer
        base = dataclasses.replace(base, mlp=field != "mlp")
    built = dataclasses.replace(base, **{field: value})
    assert getattr(built, field) is bool(value)


INT_BAD = [
    "8",
    2.5,
    "int-valued-float",
    True,
    np.bool_(False),
    float("nan"),
    float("inf"),
    "float-tensor",
    [1],
]


@pytest.mark.parametrize("cls, field, hint", _fields("int"))
@pytest.mark.parametrize("bad", INT_BAD, ids=repr)
def test_int_fields_refuse_non_integral_values(cls, field, hint, bad):
    base, v = _valid(cls, field, "int")
    if bad == "int-valued-float":
        bad = float(v)
    elif bad == "float-tensor":
        bad = torch.tensor(float(v))
    with refused(
        r"must be (an|a non-negative) int.*\(a Python int, a NumPy integer or a 0-d",
        f"{cls.__name__}.{field}",
    ):
        dataclasses.replace(base, **{field: bad})
    if not _optional(hint):
        with refused("int", f"{cls.__name__}.{field}", "None"):
            dataclasses.replace(base, **{field: None})
    else:
        assert getattr(dataclasses.replace(base, **{field: None}), field) is None


FLOAT_BAD = ["0.5", True, np.bool_(True), float("nan"), float("inf"), float("-inf"), [0.5]]


@pytest.mark.parametrize("cls, field, hint", _fields("float"))
@pytest.mark.parametrize("bad", FLOAT_BAD, ids=repr)
def test_float_fields_refuse_non_real_values(cls, field, hint, bad):
    base, _ = _valid(cls, field, "float")
    match = r"must be a (finite )?number"
    with refused(match, f"{cls.__name__}.{field}", repr(bad) if isinstance(bad, str) else ""):
        dataclasses.replace(base, **{field: bad})
    if not _optional(hint):
        with refused(match, f"{cls.__name__}.{field}"):
            dataclasses.replace(base, **{field: None})


@pytest.mark.parametrize("cls, field, hint", _fields("bool"))
@pytest.mark.parametrize("bad", [1, 0, "True", "false", 1.0, np.int64(1)], ids=repr)
def test_bool_fields_refuse_non_bools(cls, field, hint, bad):
    base, _ = _valid(cls, field, "bool")
    with refused(r"must be True or False", f"{cls.__name__}.{field}", repr(bad)):
        dataclasses.replace(base, **{field: bad})


@pytest.mark.parametrize("cls, field, hint", _fields("literal"))
@pytest.mark.parametrize("bad", ["nope", "", 1, True, None], ids=repr)
def test_choice_fields_refuse_other_values(cls, field, hint, bad):
    base, _ = _valid(cls, field, "literal")
    choices = typing.get_args(hint)
    with refused(r"must be one of", f"{cls.__name__}.{field}", repr(choices), repr(bad)):
        dataclasses.replace(base, **{field: bad})
    for c in choices:
        assert getattr(dataclasses.replace(base, **{field: np.str_(c)}), field) == c


@pytest.mark.parametrize("cls, field, hint", _fields("tuple"))
@pytest.mark.parametrize(
    "bad, match",
    [
        ("ab", "must be a tuple"),
        (5, "must be a tuple"),
        ((1, 2, 3), r"tuple of 2 values .*\(3 values\)"),
        ((1,), r"tuple of 2 values .*\(1 values\)"),
        (("1", None), r"\[0\] must be an int"),
        ((1.5, None), r"\[0\] must be an int"),
        ((True, -1), r"\[0\] must be an int"),
        ((1, 2.0), r"\[1\] must be an int .* or None"),
    ],
    ids=repr,
)
def test_pair_fields_refuse_bad_pairs(cls, field, hint, bad, match):
    base, v = _valid(cls, field, "tuple")
    with refused(match, f"{cls.__name__}.{field}"):
        dataclasses.replace(base, **{field: bad})
    wrapped = [np.int64(x) if x is not None else None for x in v]
    assert dataclasses.replace(base, **{field: wrapped}) == base  # a list, NumPy ints: the same


@pytest.mark.parametrize("cls, field, hint", _fields("int"))
def test_negative_ints_refused_where_counts(cls, field, hint):
    """Every count-like int hyper-parameter keeps its own range check; negative layers
    (counted from the end) and seeds are allowed."""
    if field == "seed" or (cls, field) in ((M3, "layer"),) or field in ("start", "end"):
        return  # M3's layer counts from the end; AIM's start/end are checked by schedule(depth)
    base, _ = _valid(cls, field, "int")
    with refused(r">= ?[01]|non-negative|positive|must be one of \(1,", field):
        dataclasses.replace(base, **{field: np.int64(-1)})


@pytest.mark.parametrize("cls", [c for c in REGISTRY.values()], ids=lambda c: c.name)
def test_method_r_accepts_integral_types_and_refuses_the_rest(cls):
    if issubclass(cls, (KVMethod, DecoderMethod, ProjectorMethod, tm.ToMeSD)):
        assert cls(r=np.int64(0)) == cls() and type(cls(r=np.int64(0)).r) is int
        with pytest.raises(ValueError, match="ratio="):
            cls(r=np.int64(8))
        with refused(R_FORMS, "unsupported budget", "'8'"):
            cls(r="8")
        return
    for v in INT_TYPES.values():
        assert cls(r=v(4)) == cls(r=4) and type(cls(r=v(4)).r) is int
    assert cls(r=[np.int64(2)] * 3) == cls(r=[2, 2, 2])
    for bad in ("4", 4.0, True, -1, (4,), [1, 2.5]):
        with refused(R_FORMS):
            cls(r=bad)


# ============================================================================ decoder and KV sites

KV = [c for c in REGISTRY.values() if issubclass(c, KVMethod)]
DEC = [c for c in REGISTRY.values() if issubclass(c, DecoderMethod)]


@pytest.mark.parametrize("cls", KV, ids=lambda c: c.name)
@pytest.mark.parametrize("kind", sorted(FLOAT64_TYPES))
def test_kv_ratio_any_real_type(cls, kind):
    wrap = FLOAT_TYPES[kind]
    assert cls(ratio=wrap(0.5)) == cls(ratio=0.5) and type(cls(ratio=wrap(0.5)).ratio) is float
    per = cls(ratio=[wrap(0.5), wrap(0.25), 0])
    assert per == cls(ratio=(0.5, 0.25, 0.0)) and plain_types(per)
    assert cls(ratio=np.array([0.5, 0.25])) == cls(ratio=(0.5, 0.25))
    assert cls(ratio=torch.tensor([0.5, 0.25])) == cls(ratio=(0.5, 0.25))
    assert cls(ratio=np.float32(0.75)).ratio == 0.75
    assert cls(ratio=0).ratio == 0.0 and type(cls(ratio=0).ratio) is float


@pytest.mark.parametrize("cls", KV, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "bad, match",
    [
        ("0.5", r"ratio must be a number"),
        (True, r"ratio must be a number"),
        (float("nan"), r"ratio must be a finite number in \[0, 1\)"),
        (float("inf"), r"ratio must be a finite number in \[0, 1\)"),
        (1.0, r"ratio must lie in \[0, 1\), got 1\.0"),
        (-0.25, r"ratio must lie in \[0, 1\), got -0\.25"),
        ([], r"ratio is an empty list"),
        ([0.5, "x"], r"ratio\[1\] must be a number"),
        ((0.5, float("nan")), r"ratio\[1\] must be a finite number"),
        ([0.5, True], r"ratio\[1\] must be a number"),
        (None, r"ratio must be a number"),
    ],
    ids=repr,
)
def test_kv_ratio_refused(cls, bad, match):
    with refused(match, f"{cls.__name__}.ratio", "fraction of the cache removed"):
        cls(ratio=bad)


@pytest.mark.parametrize("cls", KV, ids=lambda c: c.name)
def test_kv_per_layer_ratios_checked_against_depth(cls):
    m = cls(ratio=[np.float64(0.0)] * 2)  # all zeros too
    with pytest.raises(ValueError, match="has 2 per-layer ratios but the model has 3"):
        m.check_depth(3)
    m.check_depth(2)


@pytest.mark.parametrize("cls", DEC, ids=lambda c: c.name)
def test_decoder_fields_any_numeric_type_and_refusals(cls):
    built = cls(ratio=np.float32(0.5), layer=np.int64(2), span=[np.int32(1), None])
    assert built == cls(ratio=0.5, layer=2, span=(1, None)) and plain_types(built)
    assert cls(ratio=torch.tensor(0.25), layer=torch.tensor(3)) == cls(ratio=0.25, layer=3)
    for bad, match in [
        ("0.5", "ratio must be a number"),
        (float("nan"), "ratio must be a finite number"),
        (True, "ratio must be a number"),
        (1.5, r"ratio must lie in \[0, 1\]"),
    ]:
        with refused(match, f"{cls.__name__}.ratio"):
            cls(ratio=bad)
    for bad, match in [("2", "must be an int"), (2.0, "pass 2"), (True, "must be an int")]:
        with refused(match, f"{cls.__name__}.layer"):
            cls(layer=bad)
    with refused(r"layer must be >= 1", f"{cls.__name__}.layer"):
        cls(layer=np.int64(0))
    if cls.schedule is DecoderMethod.schedule:  # AIM schedules by start/end instead
        with pytest.raises(ValueError, match="layer=2, but the model has 2 layers"):
            cls(ratio=0.5, layer=np.int64(2)).schedule(2)


# ============================================================================ other method inputs


def test_dtome_thresholds_and_calibration_inputs():
    for t in (np.float32(0.5), torch.tensor(0.5), 0.5, np.int64(1)):
        assert torch.equal(DToMe(thresholds=t).thresholds, torch.tensor(float(t)))
    for t in (np.array([0.5, 1]), [np.float64(0.5), 1], torch.tensor([0.5, 1.0])):
        assert torch.equal(DToMe(thresholds=t).thresholds, torch.tensor([0.5, 1.0]))
    assert DToMe(thresholds=math.inf).threshold(0) == math.inf  # inf: merge nothing
    for bad in ("0.9", True, np.bool_(True), torch.tensor([True]), ["a"]):
        with refused(r"DToMe\.thresholds must be a number .*one per layer", repr(bad)):
            DToMe(thresholds=bad)
    with pytest.raises(ValueError, match=r"DToMe\.thresholds must not be NaN"):
        DToMe(thresholds=[0.5, float("nan")])
    with pytest.raises(ValueError, match=r"DToMe\.thresholds must not be NaN"):
        DToMe().load_state_dict({"thresholds": torch.tensor(float("nan"))})
    model = _tiny_vit()
    for bad, match in [(6.5, "TargetTokens.tokens"), ("64", "TargetTokens.tokens"), (0, ">= 1")]:
        with refused(match):
            tm.calibrate(model, DToMe(), [torch.zeros(1, 3, 32, 32)], target_tokens=bad)
    with refused("batch_size must be an int >= 1"):
        tm.calibrate(model, DToMe(), torch.zeros(2, 3, 32, 32), target_tokens=16, batch_size=0)
    assert not hasattr(model, "_tokenmerge_patch")


def test_m3_pooling_side_and_layer():
    assert M3(r=np.int64(2), layer=np.int64(-1)) == M3(r=2, layer=-1)
    assert PoolAt(np.int64(2), torch.tensor(1)) == PoolAt(2, 1)
    assert type(M3(r=torch.tensor(4)).budget.side) is int
    with refused(r"M3's pooling side r must be a non-negative int"):
        PoolAt(-2)
    with refused(r"M3's pooling side r must be a non-negative int", "2.0"):
        PoolAt(2.0)
    with refused(r"M3\.layer must be an int .* or None", "'1'"):
        PoolAt(2, "1")


# ============================================================================ at tm.apply


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4).eval()


BLOCK = sorted(n for n, c in REGISTRY.items() if c.site == "block")


@pytest.mark.parametrize("name", BLOCK)
@pytest.mark.parametrize("rs", [[0, 0], [0, 0, 0, 0], [0], [1, 1], [np.int64(1)] * 4, []], ids=repr)
def test_wrong_length_per_layer_list_refused_before_any_forward(name, rs):
    model = _tiny_vit()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    method = REGISTRY[name](r=rs) if name != "dtome" else DToMe(r=rs, thresholds=0.9)
    with pytest.raises(ValueError, match=rf"has {len(rs)} values but the model has 3 patched"):
        tm.apply(model, method)
    assert calls == [] and not hasattr(model, "_tokenmerge_patch")
    with pytest.raises(ValueError, match=rf"has {len(rs)} values"), tm.patched(model, method):
        model(torch.zeros(1, 3, 32, 32))
    assert calls == []


@pytest.mark.parametrize("name", BLOCK)
def test_right_length_zero_list_is_the_identity(name):
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        method = REGISTRY[name](r=[np.int64(0)] * 3)
        if name == "dtome":
            method = DToMe(r=[0, 0, 0], thresholds=math.inf)
        with warnings.catch_warnings(), tm.patched(model, method):
            warnings.simplefilter("ignore")
            got = model(x)
    assert torch.equal(got, want)


def test_m3_layer_out_of_range_refused_at_apply():
    model = _tiny_vit()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"M3 layer=5 is out of range .* 3 patched layers"):
        tm.apply(model, M3(r=2, layer=5))
    with pytest.raises(ValueError, match=r"M3 layer=-4 is out of range"):
        tm.apply(model, M3(r=2, layer=np.int64(-4)))
    assert calls == [] and not hasattr(model, "_tokenmerge_patch")
