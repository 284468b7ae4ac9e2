"""The method × adapter matrix: identity at budget 0, exact removal, counts, invariants."""

from __future__ import annotations

import pytest
import torch
from models import FACTORIES, all_models, images, make

import tokenmerge as tm
from tokenmerge.methods import REGISTRY


@all_models
@pytest.mark.parametrize("method", sorted(n for n, c in REGISTRY.items() if c.site == "block"))
@torch.no_grad()
def test_zero_budget_is_bit_identical_and_remove_restores(name, method):
    model, run = make(name)
    x = images()
    ref = run(model, x)
    tm.apply(model, REGISTRY[method].example(0))
    assert torch.equal(run(model, x), ref)
    tm.remove(model)
    assert torch.equal(run(model, x), ref)
    # a real reduction, then removal: identical again
    tm.apply(model, REGISTRY[method].example(4))
    reduced = run(model, x)
    assert reduced.shape == ref.shape
    tm.remove(model)
    assert torch.equal(run(model, x), ref)
    assert not hasattr(model, "_tokenmerge_patch")


@all_models
@torch.no_grad()
def test_counts_follow_schedule_and_sizes_are_conserved(name):
    model, run = make(name)
    x = images()
    with tm.patched(model, tm.ToMe(r=(6, -0.5))):
        run(model, x)
        st = tm.state(model)
        patch = tm.patch_of(model)
    n0 = st.n_orig
    p = patch.target.n_prefix
    expected = tm.Inflection(6, -0.5).schedule(n0, p, patch.target.cost, tm.ToMe().max_r)
    counts = [int(c[0]) for c in st.tokens_per_layer]
    assert counts == patch.target.cost.tokens(n0, expected)
    assert all(bool((c == c[0]).all()) for c in st.tokens_per_layer)
    torch.testing.assert_close(st.size.sum(1), torch.full((x.shape[0],), float(n0)))
    assert bool(st.protected[:, :p].all()) and int(st.protected.sum(1)[0]) == p
    assert torch.equal(st.pos[:, :p], torch.arange(p).expand(x.shape[0], p))
    # unmerge restores the full grid
    full = st.unmerge(torch.randn(x.shape[0], st.size.shape[1], 7))
    assert full.shape == (x.shape[0], n0, 7)


@all_models
@torch.no_grad()
def test_batch_independence(name):
    model, run = make(name)
    x = images(4)
    tm.apply(model, tm.ToMe(r=8))
    together = run(model, x)
    alone = torch.cat([run(model, x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_summary_reports_counts_and_flops():
    model, run = make("hf-vit-sdpa")
    with tm.patched(model, tm.ToMe(r=8)):
        run(model, images())
        s = tm.summary(model)
        cost = tm.patch_of(model).target.cost
    assert s["tokens_in"] == 65.0 and s["tokens_per_layer"] == [57.0, 49.0, 41.0]
    assert s["tokens_per_layer_std"] == [0.0, 0.0, 0.0]
    by_hand = sum(cost.layer_flops(n, m) for n, m in [(65, 57), (57, 49), (49, 41)])
    assert abs(s["flops_ratio"] - by_hand / (3 * cost.layer_flops(65, 65))) < 1e-12


@torch.no_grad()
def test_merging_changes_output_but_little():
    model, run = make("timm-dinov2-like")
    x = images()
    ref = run(model, x)
    with tm.patched(model, tm.ToMe(r=8)):
        out = run(model, x)
    assert not torch.equal(out, ref)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.9


@torch.no_grad()
def test_proportional_attention_uses_log_size_bias():
    """With prop_attn on, the mask passed to attention after a merge is log(size)."""
    model, run = make("hf-dinov2-sdpa")
    seen = []
    attn = [m for m in model.modules() if type(m).__name__ == "Dinov2Attention"][1]
    attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True
    )
    with tm.patched(model, tm.ToMe(r=8, prop_attn=True)):
        run(model, images())
    assert seen[-1] is not None
    assert seen[-1].shape[1:3] == (1, 1)
    assert torch.isclose(seen[-1].exp().sum(-1), torch.tensor(float(65))).all()
    seen.clear()
    with tm.patched(model, tm.ToMe(r=8, prop_attn=False)):
        run(model, images())
    assert seen[-1] is None


def test_matrix_covers_every_family():
    fams = {n.rsplit("-", 1)[0] if n.startswith("hf") else n for n in FACTORIES}
    assert {"hf-vit", "hf-deit", "hf-dinov2", "hf-clip", "hf-siglip"} <= fams
