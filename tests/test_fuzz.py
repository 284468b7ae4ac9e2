"""An API fuzz test (issue 9, class 7).

Hypothesis draws a method, a budget (valid or not), a model family (tiny configs with every
structural feature of the real ones), a batch size (0 included), an image size (non-square
included) or a padding pattern. Every draw must end in one of two ways:

- a clear error raised by tokenmerge itself (``ValueError``, ``TypeError`` or
  ``UnsupportedModelError`` whose innermost frame is in tokenmerge) at construction, at
  ``tm.apply`` or at the first forward; or
- outputs of the unpatched shape, finite, with the scheduled token counts, and bit-identical
  to the unpatched model at budget 0.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import FACTORIES, make
from test_text import BERT_IDS, batch, make_text

import tokenmerge as tm
from tokenmerge.adapters import UnsupportedModelError
from tokenmerge.adapters.hf_text import mean_pool
from tokenmerge.methods import REGISTRY

BLOCK = sorted(n for n, c in REGISTRY.items() if c.site == "block")
PACKAGE = str(Path(tm.__file__).parent)
CLEAR = (ValueError, TypeError, UnsupportedModelError)
_MODELS: dict[str, tuple] = {}


def _model(name: str):
    if name not in _MODELS:
        _MODELS[name] = make(name) if name in FACTORIES else (make_text(name), None)
    return _MODELS[name]


budgets = st.one_of(
    st.integers(0, 40),
    st.tuples(st.integers(0, 24), st.floats(-1.0, 1.0)),
    st.lists(st.integers(0, 12), min_size=1, max_size=4),  # depth is 3: other lengths refused
    st.floats(0.05, 1.0).map(tm.KeepRatio),
    st.integers(1, 80).map(tm.TargetTokens),
    st.floats(0.1, 1.0).map(tm.TargetFlops),
    st.sampled_from(["8", math.nan, 2.5, True, -3, (4,), None]),  # malformed
)


def _build(method: str, budget):
    cls = REGISTRY[method]
    if method == "dtome" and isinstance(budget, int) and not isinstance(budget, bool):
        return cls.example(min(budget, 8))  # calibrated thresholds for that budget
    return cls(r=budget)


def _is_clear(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return isinstance(err, CLEAR) and bool(frames) and frames[-1].filename.startswith(PACKAGE)


def _outcome(model, method, forward):
    """Apply and run; returns the output, or None after a clear tokenmerge error."""
    try:
        tm.apply(model, method)
    except CLEAR as e:
        assert _is_clear(e), f"unclear error at apply: {e!r}"
        return None
    try:
        return forward()
    except CLEAR as e:
        assert _is_clear(e), f"unclear error at the first forward: {e!r}"
        return None


def _check(model, method, forward, ref, exact_counts):
    out = _outcome(model, method, forward)
    try:
        if out is None:
            return
        assert out.shape == ref.shape
        assert torch.isfinite(out).all()
        if method.budget.is_zero:
            assert torch.equal(out, ref)
        exact_counts(tm.patch_of(model), tm.state(model))
    finally:
        if getattr(model, "_tokenmerge_patch", None) is not None:
            tm.remove(model)
    with torch.no_grad():  # removal restored the model exactly
        assert torch.equal(forward(), ref)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(FACTORIES)),
    method=st.sampled_from(BLOCK),
    budget=budgets,
    b=st.integers(0, 3),
    hw=st.tuples(st.integers(4, 12), st.integers(4, 12)),
)
@torch.no_grad()
def test_vision_draws_end_in_a_clear_error_or_a_correct_reduction(name, method, budget, b, hw):
    model, run = _model(name)
    if name.startswith("hf") and not name.startswith("hf-dinov2"):
        x = torch.randn(b, 3, 4 * hw[0], 4 * hw[1])  # interpolated position table
        forward = lambda: model(pixel_values=x, interpolate_pos_encoding=True).pooler_output  # noqa: E731
    else:
        x = torch.randn(b, 3, 32, 32) if name.startswith("timm") else torch.randn(b, 3, *(
            4 * v for v in hw))  # fmt: skip
        forward = lambda: run(model, x)  # noqa: E731
    try:
        ref = forward()
    except RuntimeError:  # the unpatched model itself cannot take this input
        return
    try:
        m = _build(method, budget)
    except CLEAR as e:
        assert _is_clear(e), f"unclear error at construction: {e!r}"
        return

    def exact_counts(patch, state):
        if m.dynamic or not m.exact_counts or b == 0:
            return
        n0 = state.n_orig
        rs = m.budget.schedule(n0, patch.target.n_prefix, patch.target.cost, m.max_r)
        got = [int(c[0]) for c in state.tokens_per_layer]
        assert got == patch.target.cost.tokens(n0, list(rs))

    _check(model, m, forward, ref, exact_counts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["bert-sdpa", "bert-eager", "distilbert-sdpa"]),
    method=st.sampled_from(BLOCK),
    budget=budgets,
    lens=st.lists(st.integers(2, 30), min_size=0, max_size=4),
    pair=st.booleans(),
    min_tokens=st.integers(0, 12),
)
@torch.no_grad()
def test_text_draws_end_in_a_clear_error_or_a_correct_reduction(
    name, method, budget, lens, pair, min_tokens
):
    model, _ = _model(name)
    if lens:
        ids, mask = batch(lens, BERT_IDS, pair_at=lens[0] // 2 if pair and lens[0] > 4 else None)
    else:
        ids = mask = torch.zeros(0, 8, dtype=torch.long)

    def forward():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return torch.cat([h[:, 0], mean_pool(model, h, mask)], 1)  # CLS and size-weighted mean

    try:
        ref = forward()
    except RuntimeError:
        return
    try:
        m = _build(method, budget)
        if min_tokens:
            m.min_tokens = min_tokens
    except CLEAR as e:
        assert _is_clear(e), f"unclear error at construction: {e!r}"
        return

    def exact_counts(patch, state):
        if m.dynamic or not m.exact_counts:
            return
        prot = state.orig_protected.sum(1)  # protected real tokens (padding never is)
        for i, n in enumerate(lens):
            rs = (0,) * 3 if n < m.min_tokens else m.budget.schedule(
                n, int(prot[i]), patch.target.cost, m.max_r)  # fmt: skip
            got = [int(c[i]) for c in state.tokens_per_layer]
            assert got == patch.target.cost.tokens(n, list(rs))

    _check(model, m, forward, ref, exact_counts)
