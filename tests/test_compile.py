"""torch.compile after tm.apply (issue 9, class 6).

At a static budget ToMe needs no data-dependent branch: the token counts follow from the
shapes, the per-forward state lives in plain attributes while Dynamo traces, so the patched
model compiles to a single graph (``fullgraph=True``) and matches eager. Methods whose counts
depend on the data (DToMe's thresholds) still compile, with graph breaks, and match eager.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from models import images, make
from test_lifecycle import _ShortToMe

import tokenmerge as tm


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _counts(model) -> list[list[int]]:
    return [c.tolist() for c in tm.state(model).tokens_per_layer]


@torch.no_grad()
def test_tome_compiles_to_one_graph_with_inductor_and_matches_eager():
    model, _ = make("timm-dinov2-like")
    x, y = images(4), images(4, seed=7)
    tm.apply(model, tm.ToMe(r=4))
    eager_x, eager_y = model(x), model(y)
    counts = _counts(model)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x), eager_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(y), eager_y, atol=1e-5, rtol=1e-5)
    assert _counts(model) == counts  # tm.state works after a compiled forward
    assert counts[-1] == [69 - 12] * 4  # CLS + 4 registers + 64 patches, r=4 in 3 blocks


@pytest.mark.parametrize("name", ["hf-vit-sdpa", "hf-dinov2-reg-eager", "hf-clip-sdpa"])
@torch.no_grad()
def test_tome_has_no_graph_break_on_hf_models(name):
    model, run = make(name)
    tm.apply(model, tm.ToMe(r=(4, -1.0)))
    explained = torch._dynamo.explain(lambda x: run(model, x))(images(2))
    assert explained.graph_break_count == 0, explained.break_reasons


STATIC = ["pitome", "tofu", "evit", "token_transforming", "visionzip"]


@pytest.mark.parametrize("method", STATIC)
@torch.no_grad()
def test_static_budget_methods_have_no_graph_break(method):
    """Every method whose count at an int budget is known from the shapes (static_kept)."""
    model, run = make("hf-dinov2-sdpa")
    tm.apply(model, tm.REGISTRY[method].example(4))
    explained = torch._dynamo.explain(lambda x: run(model, x))(images(2))
    assert explained.graph_break_count == 0, explained.break_reasons


@torch.no_grad()
def test_data_dependent_methods_compile_with_breaks_and_match_eager():
    model, run = make("hf-dinov2-sdpa")
    x = images(3)
    tm.apply(model, tm.REGISTRY["dtome"].example(4))
    want = run(model, x)
    counts = _counts(model)
    got = torch.compile(lambda v: run(model, v), backend="aot_eager")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _counts(model) == counts


@torch.no_grad()
def test_the_self_check_still_fires_under_compile():
    model, _ = make("timm-avgpool")
    tm.apply(model, _ShortToMe(r=4))
    with pytest.raises(tm.ReductionNotApplied, match="schedule leaves"):
        torch.compile(model, backend="eager")(images(2))
