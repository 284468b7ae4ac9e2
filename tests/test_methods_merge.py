"""PiToMe, DToMe and ToFu against slow references written from their papers' equations.

The references below use plain Python loops over tokens (no batching, no sorting tricks) and
are compared with the vectorised methods on small random inputs with protected tokens,
padding and per-sample budgets. DToMe is also checked end to end: calibration reaches its
target on held-out images, token counts do not depend on the batch, thresholds round-trip.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import all_models, images, make
from test_reduction import naive_split

import tokenmerge as tm
from tokenmerge.core.budget import as_budget
from tokenmerge.core.state import Signals, TokenState
from tokenmerge.methods.dtome import DToMe, batch_threshold
from tokenmerge.methods.matching import best_edges
from tokenmerge.methods.pitome import PiToMe
from tokenmerge.methods.tofu import ToFu

DEPTH = 6


# ---------------------------------------------------------------------------------- references
def cos(metric, i, j):
    a, b = metric[i], metric[j]
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def naive_pitome(metric, mergeable, r, margin, alpha):
    """PiToMe's matching for one sample: ``{A token: B token it merges into}``."""
    n = len(metric)
    u = [i for i in range(n) if mergeable[i]]

    def f(v):  # the margin kernel
        return v - margin if v >= margin else alpha * (math.exp(v - margin) - 1.0)

    energy = {i: sum(f(cos(metric, i, j)) for j in u) / len(u) for i in u}
    ranked = sorted(u, key=lambda i: (-energy[i], i))  # highest energy first, ties by position
    r = min(r, len(u) // 2)
    cand = ranked[: 2 * r]
    a, b = cand[0::2], sorted(cand[1::2])
    into = {}
    for i in a:  # every A token merges into its most similar B token
        best, best_j = -math.inf, None
        for j in b:
            s = cos(metric, i, j)
            if s > best:
                best, best_j = s, j
        into[i] = best_j
    return into


def naive_edges(metric, mergeable):
    """ToMe's bipartite edges for one sample: each A token's best B token (``naive_split``)."""
    edges = []
    a, b = naive_split(mergeable)
    for i in a:
        best, best_j = -math.inf, None
        for j in b:
            if cos(metric, i, j) > best:
                best, best_j = cos(metric, i, j), j
        if best_j is not None:
            edges.append((best, i, best_j))
    return edges


def top_edges(edges, r):
    """The ``r`` most similar edges (ties: the earlier A token first)."""
    return sorted(edges, key=lambda e: (-e[0], e[1]))[:r]


def naive_apply(x, size, valid, into=None, dropped=(), mode="mean"):
    """Outputs of one sample, in the order of their representatives, with their sizes.

    ``into`` maps merged tokens to their destination; ``dropped`` tokens vanish; padding
    (``valid`` False) vanishes. ``mode="mlerp"``: the size-weighted mean rescaled to the
    largest norm among the tokens merged into it (ToFu's MLERP).
    """
    into = into or {}
    groups = {j: [j] for j in range(len(x)) if valid[j] and j not in into and j not in set(dropped)}
    for i, j in into.items():
        groups[j].append(i)
    feats, sizes = [], []
    for j in sorted(groups):
        total = sum(float(size[i]) for i in groups[j])
        mean = sum(x[i] * float(size[i]) for i in groups[j]) / total
        if mode == "mlerp":
            mean = mean * max(float(x[i].norm()) for i in groups[j]) / mean.norm()
        feats.append(mean)
        sizes.append(total)
    return torch.stack(feats), torch.tensor(sizes, dtype=x.dtype)


def synthetic(seed, b, n, n_prot, pads, clusters=3):
    """Random tokens with a cluster structure, sizes, protected prefix and end padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 5, generator=g, dtype=torch.float64)
    centers = torch.randn(clusters, 4, generator=g, dtype=torch.float64)
    which = torch.randint(0, clusters, (b, n), generator=g)
    metric = centers[which] + 0.4 * torch.randn(b, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n), generator=g).double()
    for i, p in enumerate(pads):
        if p:
            size[i, n - p :] = 0.0
            x[i, n - p :] = 0.0
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, :n_prot] = True
    state = TokenState.start(x, protected, size=size, depth=DEPTH)
    sig = Signals(x=x, k=metric[:, None])  # one head: the metric is the key itself
    mergeable = (size > 0) & ~protected
    return x, metric, size, mergeable, state, sig


def check_sample(y, s, i, ref_x, ref_s):
    k = len(ref_s)
    torch.testing.assert_close(y[i, :k], ref_x)
    torch.testing.assert_close(s[i, :k], ref_s)
    assert bool((s[i, k:] == 0).all()), "every output after the real ones must be padding"


inputs = dict(
    n=st.integers(3, 20),
    n_prot=st.integers(0, 2),
    pad=st.integers(0, 4),
    r_frac=st.floats(0.0, 1.0),
    per_sample=st.booleans(),
    seed=st.integers(0, 10_000),
)


def budget_for(n, n_prot, pad, r_frac, per_sample):
    pads = [0, min(pad, n - n_prot - 1)]
    caps = [(n - p - n_prot) // 2 for p in pads]
    if per_sample:
        return pads, torch.tensor([int(r_frac * c) for c in caps])
    return pads, int(r_frac * min(caps))


def r_of(r, i):
    return int(r[i]) if isinstance(r, torch.Tensor) else r


# ---------------------------------------------------------------------------------- PiToMe
@settings(max_examples=60, deadline=None)
@given(
    **inputs,
    layer=st.integers(0, DEPTH - 1),
    margin=st.floats(0.0, 1.0),
    alpha=st.floats(0.1, 2.0),  # α = 0 ties every token without close neighbours exactly
)
def test_pitome_matches_reference(n, n_prot, pad, r_frac, per_sample, seed, layer, margin, alpha):
    pads, r = budget_for(n, n_prot, pad, r_frac, per_sample)
    x, metric, size, mergeable, state, sig = synthetic(seed, 2, n, n_prot, pads)
    red = PiToMe(margin=margin, alpha=alpha).reduce(sig, state, r, layer)
    if not bool(torch.as_tensor(r).gt(0).any()):
        assert red is None
        return
    y, s = red.apply(x, size)
    m_l = margin - margin * layer / DEPTH  # the paper's margin schedule over depth
    for i in range(2):
        into = naive_pitome(metric[i], mergeable[i], r_of(r, i), m_l, alpha)
        assert len(into) == r_of(r, i)  # exactly r tokens are removed
        check_sample(y, s, i, *naive_apply(x[i], size[i], size[i] > 0, into))


def test_pitome_protects_isolated_tokens():
    """A big cluster (6), a small one (2) and two outliers: with r = 2 the four candidates
    come from the big cluster (highest energy) and the small cluster and outliers survive."""
    g = torch.Generator().manual_seed(0)
    base = torch.eye(4, dtype=torch.float64)
    metric = torch.stack([base[0]] * 6 + [base[1]] * 2 + [base[2], base[3]])
    metric = (metric + 0.01 * torch.randn(10, 4, generator=g, dtype=torch.float64))[None]
    x = torch.randn(1, 10, 3, dtype=torch.float64, generator=g)
    state = TokenState.start(x, torch.zeros(1, 10, dtype=torch.bool), depth=DEPTH)
    red = PiToMe(margin=0.5).reduce(Signals(x=x, k=metric[:, None]), state, 2, 0)
    kept = red.rep[0].tolist()
    assert len(kept) == 8 and {6, 7, 8, 9} <= set(kept)
    merged = [i for i in range(10) if i not in kept]
    assert all(i < 6 and int(red.rep[0, red.index[0, i, 0]]) < 6 for i in merged)


# ---------------------------------------------------------------------------------- ToFu
@settings(max_examples=60, deadline=None)
@given(**inputs, layer=st.integers(0, DEPTH - 1), merge_from=st.integers(0, DEPTH))
def test_tofu_matches_reference(n, n_prot, pad, r_frac, per_sample, seed, layer, merge_from):
    pads, r = budget_for(n, n_prot, pad, r_frac, per_sample)
    x, metric, size, mergeable, state, sig = synthetic(seed, 2, n, n_prot, pads)
    red = ToFu(merge_from=merge_from).reduce(sig, state, r, layer)
    if not bool(torch.as_tensor(r).gt(0).any()):
        assert red is None
        return
    y, s = red.apply(x, size)
    for i in range(2):
        kept = top_edges(naive_edges(metric[i], mergeable[i]), r_of(r, i))
        assert len(kept) == r_of(r, i)
        if layer < merge_from:  # prune: the A token of each kept edge is dropped
            ref = naive_apply(x[i], size[i], size[i] > 0, dropped=[a for _, a, _ in kept])
        else:  # MLERP merge
            into = {a: b for _, a, b in kept}
            ref = naive_apply(x[i], size[i], size[i] > 0, into, mode="mlerp")
        check_sample(y, s, i, *ref)


def test_tofu_switch_default_follows_depth():
    assert ToFu().switch(12) == 7  # blocks 0-6 prune, 7-11 merge
    assert ToFu(merge_from=3).switch(12) == 3
    with pytest.raises(ValueError):
        ToFu(merge_from=-1)


@torch.no_grad()
def test_tofu_prunes_early_and_merges_norm_preserving_late():
    model, run = make("timm-dinov2-like")  # 3 blocks: block 0-1 prune, block 2 merges
    with tm.patched(model, ToFu(r=6)):
        run(model, images())
        st_ = tm.state(model)
    # pruning loses the dropped sizes, the last (merging) block conserves them
    n0 = st_.n_orig
    total = st_.size.sum(1)
    assert bool((total == n0 - 2 * 6).all())
    assert [int(c[0]) for c in st_.tokens_per_layer] == [n0 - 6, n0 - 12, n0 - 18]


# ---------------------------------------------------------------------------------- DToMe
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 20),
    n_prot=st.integers(0, 2),
    pad=st.integers(0, 4),
    tau=st.floats(-0.5, 1.0),
    layer=st.integers(0, DEPTH - 1),
    seed=st.integers(0, 10_000),
)
def test_dtome_inference_matches_reference(n, n_prot, pad, tau, layer, seed):
    pads = [0, min(pad, n - n_prot - 1)]
    x, metric, size, mergeable, state, sig = synthetic(seed, 2, n, n_prot, pads)
    taus = torch.linspace(-0.2, 0.8, DEPTH)
    taus[layer] = tau
    red = DToMe(thresholds=taus).reduce(sig, state, 0, layer)
    refs = []
    for i in range(2):
        edges = naive_edges(metric[i], mergeable[i])
        into = {a: b for s_, a, b in edges if s_ > float(taus[layer])}
        refs.append((into, naive_apply(x[i], size[i], size[i] > 0, into)))
    if red is None:  # nothing merged anywhere
        assert all(not into for into, _ in refs)
        return
    y, s = red.apply(x, size)
    for i, (_, ref) in enumerate(refs):
        check_sample(y, s, i, *ref)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    n=st.integers(3, 16),
    n_prot=st.integers(0, 2),
    r=st.integers(0, 8),
    seed=st.integers(0, 10_000),
)
def test_dtome_batch_threshold_matches_reference(b, n, n_prot, r, seed):
    """Calibration step: the top r·B edges of the whole batch, and the (r·B)-th edge as τ."""
    pads = [0] * b
    _, metric, _, mergeable, _, _ = synthetic(seed, b, n, n_prot, pads)
    tau, counts = batch_threshold(best_edges(metric, mergeable)[0], r * b)
    edges = [(s_, i, a) for i in range(b) for s_, a, _ in naive_edges(metric[i], mergeable[i])]
    edges.sort(key=lambda e: (-e[0], e[1], e[2]))
    rb = min(r * b, len(edges))
    merged = edges[:rb]
    ref_counts = [sum(1 for e in merged if e[1] == i) for i in range(b)]
    assert counts.tolist() == ref_counts
    if rb == 0:
        assert tau == math.inf
    elif rb == len(edges):
        assert tau == 0.0
    else:
        assert tau == pytest.approx(max(edges[rb][0], 0.0), abs=1e-12)


@torch.no_grad()
def test_dtome_calibration_merges_top_edges_of_the_batch():
    """During calibration the batch mean follows the schedule exactly (any budget kind) while
    images merge different numbers of tokens."""
    model, _ = make("timm-dinov2-like")
    x = images(8, seed=5)
    dt = DToMe()
    tm.apply(model, dt)  # calibrate also works on a model patched with this very instance
    patch = tm.patch_of(model)
    n0, p = 69, 5  # 64 patches + CLS + 4 registers
    for budget in [6, (6, -0.5), tm.KeepRatio(0.8), [4, 8, 2]]:
        tm.calibrate(model, dt, [x], r=budget)
        counts = torch.stack(tm.state(model).tokens_per_layer).double()
        schedule = as_budget(budget).schedule(n0, p, patch.target.cost, dt.max_r)
        expected = patch.target.cost.tokens(n0, schedule)
        assert counts.mean(1).tolist() == [float(e) for e in expected]
        assert len(set(counts[-1].tolist())) > 1  # images reach different counts
        assert dt.thresholds.shape == (3,) and bool((dt.thresholds >= 0).all())
    tm.remove(model)


def _tokens_reached(model):
    s = tm.summary(model)
    return s["tokens_per_layer"][-1], s["tokens_per_layer_std"][-1]


def _held_out_mean(model, run, method, x):
    with tm.patched(model, method):
        run(model, x)
        return _tokens_reached(model)


@torch.no_grad()
def test_dtome_calibration_reaches_target_on_held_out_images_tiny():
    model, run = make("hf-dinov2-sdpa")  # 64 patches + CLS, 3 layers
    calib = images(96, seed=11)
    held_out = images(48, seed=12)
    dt = tm.calibrate(model, DToMe(), calib, target_tokens=35, batch_size=16)
    mean, std = _held_out_mean(model, run, dt, held_out)
    assert abs(mean - 35) <= 0.05 * 35, (mean, std, dt.thresholds)
    assert std > 0  # the count is per image


@pytest.mark.real
@torch.no_grad()
def test_dtome_calibration_reaches_target_on_held_out_images_dinov2():
    """Real DINOv2-S: calibrate on 32 textile images to 101 tokens (r = 13), check 16 others."""
    zoo = pytest.importorskip("tokenmerge.eval.zoo")
    data = pytest.importorskip("tokenmerge.eval.data")
    try:
        vm = zoo.load_vision("dinov2-s", backend="timm")
        ims, _, _ = data.textiles(n=48, seed=0)
    except (zoo.AssetError, zoo.MissingPackageError) as e:  # pragma: no cover - setup
        pytest.skip(f"offline zoo unavailable: {e}")
    x = vm.preprocess(ims)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    calib, held_out = x[perm[:32]], x[perm[32:]]
    dt = tm.calibrate(vm.model, DToMe(), calib, target_tokens=101, batch_size=8)
    with tm.patched(vm.model, dt):
        vm.tokens(held_out)
        mean, std = _tokens_reached(vm.model)
    assert abs(mean - 101) <= 0.05 * 101, (mean, std, dt.thresholds)


@all_models
@torch.no_grad()
def test_dtome_batch_independence_is_exact_for_counts(name):
    model, run = make(name)
    x = images(4, seed=3)
    tm.apply(model, DToMe.example(4))
    together = run(model, x)
    counts = torch.stack(tm.state(model).tokens_per_layer, 1)  # [B, L]
    assert len(set(counts[:, -1].tolist())) > 1, "the images should keep different counts"
    for i in range(4):
        alone = run(model, x[i : i + 1])
        assert torch.stack(tm.state(model).tokens_per_layer, 1)[0].tolist() == counts[i].tolist()
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)
    tm.remove(model)


@all_models
@torch.no_grad()
def test_dtome_padding_slots_skip_the_mlp(name, monkeypatch):
    """A batch padded to its widest sample runs each MLP on the real tokens only, with the same
    result as the MLP over the padded batch (the reference: the model's own MLP branch)."""
    from tokenmerge.adapters import patch as engine

    model, run = make(name)
    blocks = tm.api.adapter_for(model).target(model).blocks
    if not all(isinstance(getattr(b, "mlp", None), torch.nn.Module) for b in blocks):
        pytest.skip("blocks without an .mlp module to count rows on")
    x = images(4, seed=3)
    rows: list[int] = []
    for b in blocks:
        b.mlp.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[:-1].numel()))
    tm.apply(model, DToMe.example(4))
    packed = run(model, x)
    real = [int(c.sum()) for c in tm.state(model).tokens_per_layer]
    packed_rows = rows[:]
    rows.clear()
    monkeypatch.setattr(engine, "mlp_on_real_tokens", lambda spec, blk, h, st: spec.mlp(blk, h))
    padded = run(model, x)
    assert packed_rows == real  # every block that merged ran its MLP on the real tokens only
    assert any(w > n for w, n in zip(rows, real, strict=True)), "the batch should be padded"
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    tm.remove(model)


@torch.no_grad()
def test_dtome_thresholds_are_the_running_mean_over_batches():
    model, _ = make("hf-vit-sdpa")
    x1, x2 = images(8, seed=21), images(8, seed=22)
    t1 = tm.calibrate(model, DToMe(), [x1], r=6).thresholds
    t2 = tm.calibrate(model, DToMe(), [x2], r=6).thresholds
    both = tm.calibrate(model, DToMe(), [x1, x2], r=6).thresholds
    assert not torch.equal(t1, t2)
    torch.testing.assert_close(both, (t1 + t2) / 2)


@torch.no_grad()
def test_dtome_state_dict_round_trip():
    model, run = make("timm-deit-distilled")
    dt = tm.calibrate(model, DToMe(), images(16, seed=4), r=5, batch_size=8)
    buf = io.BytesIO()
    torch.save(dt.state_dict(), buf)
    buf.seek(0)
    loaded = DToMe()
    loaded.load_state_dict(torch.load(buf))
    assert torch.equal(loaded.thresholds, dt.thresholds)
    assert loaded.state_dict()["num_batches"].item() == 2
    x = images(3, seed=9)
    with tm.patched(model, dt):
        ref = run(model, x)
    with tm.patched(model, loaded):
        out = run(model, x)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_dtome_errors():
    model, run = make("timm-avgpool")
    with tm.patched(model, DToMe()), pytest.raises(ValueError, match="calibrate"):
        run(model, images())
    with tm.patched(model, tm.ToMe(r=2)), pytest.raises(ValueError, match="patched with"):
        tm.calibrate(model, DToMe(), [images()], r=2)
    with pytest.raises(ValueError):
        tm.calibrate(model, DToMe(), [], r=2)
    with pytest.raises(RuntimeError):
        DToMe().state_dict()
    with pytest.raises(TypeError, match="calibrated methods: dtome"):
        tm.calibrate(model, tm.ToMe(r=2), [images()])
    assert not hasattr(model, "_tokenmerge_patch")


# ---------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("method", [PiToMe, ToFu])
@pytest.mark.parametrize(
    "budget",
    [4, (4, -1.0), [2, 6, 4], tm.KeepRatio(0.85), tm.TargetFlops(0.6), tm.TargetTokens(30)],
    ids=["int", "inflection", "list", "keep", "flops", "tokens"],
)
@torch.no_grad()
def test_budget_kinds_give_their_schedule(method, budget):
    model, run = make("hf-dinov2-reg-sdpa")
    m = method(r=budget)
    with tm.patched(model, m):
        run(model, images())
        st_ = tm.state(model)
        cost = tm.patch_of(model).target.cost
    n0, p = st_.n_orig, 5
    expected = cost.tokens(n0, m.budget.schedule(n0, p, cost, m.max_r))
    assert [int(c[0]) for c in st_.tokens_per_layer] == expected
    assert expected[-1] < n0
