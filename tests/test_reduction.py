"""The reduction core against slow references, and its invariants (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmerge.core import Reduction
from tokenmerge.methods.matching import bipartite_targets


def naive_split(mergeable):
    """ToMe's sets A and B: the mergeable tokens alternate A, B, A, ... in position order, the
    first one in A when its position is even (the paper's even/odd split when they are
    contiguous)."""
    idx = [i for i, m in enumerate(mergeable) if m]
    if not idx:
        return [], []
    a = [i for k, i in enumerate(idx) if (k + idx[0]) % 2 == 0]
    return a, [i for i in idx if i not in a]


def naive_tome(x, size, metric, protected, r):
    """ToMe's bipartite soft matching for one sample, written with plain loops from the paper.

    Returns the merged tokens in their original order with their sizes.
    """
    n = len(x)
    cos = lambda i, j: float(  # noqa: E731
        torch.dot(metric[i], metric[j]) / (metric[i].norm() * metric[j].norm())
    )
    a, b = naive_split([not p for p in protected])
    edges = []
    for i in a:
        best, best_j = -float("inf"), None
        for j in b:
            s = cos(i, j)
            if s > best:
                best, best_j = s, j
        if best_j is not None:
            edges.append((best, i, best_j))
    edges.sort(key=lambda e: -e[0])
    merged_into = {i: j for _, i, j in edges[:r]}
    acc = {j: (x[j] * size[j], float(size[j])) for j in range(n) if j not in merged_into}
    for i, j in merged_into.items():
        f, s = acc[j]
        acc[j] = (f + x[i] * size[i], s + float(size[i]))
    keep = sorted(acc)
    feats = torch.stack([acc[j][0] / acc[j][1] for j in keep])
    sizes = torch.tensor([acc[j][1] for j in keep], dtype=x.dtype)
    return feats, sizes


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 24),
    r_frac=st.floats(0.0, 1.0),
    n_prot=st.integers(0, 2),
    inner=st.integers(0, 3),
    seed=st.integers(0, 10_000),
)
def test_bipartite_matches_naive_reference(n, r_frac, n_prot, inner, seed):
    g = torch.Generator().manual_seed(seed)
    b, c = 2, 5
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    metric = torch.randn(b, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n), generator=g).double()
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, :n_prot] = True
    if inner:  # protected tokens between mergeable ones (a [SEP] inside a text pair)
        protected[:, torch.randperm(n, generator=g)[:inner]] = True
    r = int(r_frac * ((n - int(protected.sum(1).max())) // 2))
    red = Reduction.from_targets(bipartite_targets(metric, ~protected, r))
    y, s = red.apply(x, size)
    assert red.n_out == n - r  # exactly r merges, wherever the protected tokens sit
    for i in range(b):
        ref_x, ref_s = naive_tome(x[i], size[i], metric[i], protected[i], r)
        torch.testing.assert_close(y[i], ref_x)
        torch.testing.assert_close(s[i], ref_s)


def random_reduction(g, b, n, kind):
    if kind == "merge":
        metric = torch.randn(b, n, 4, generator=g)
        r = int(torch.randint(0, n // 2 + 1, (1,), generator=g))
        return Reduction.from_targets(bipartite_targets(metric, torch.ones(b, n, dtype=bool), r))
    if kind == "prune":
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        keep = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])
        return Reduction.select(keep, n)
    # soft many-to-many: the first half are targets, every other token spreads over two of them
    t = max(n // 2, 1)
    target = torch.arange(n).repeat(b, 1)
    tgt = torch.stack([target, target], -1)
    tgt[:, t:, 0] = torch.randint(0, t, (b, n - t), generator=g)
    tgt[:, t:, 1] = torch.randint(0, t, (b, n - t), generator=g)
    w = torch.rand(b, n, 2, generator=g)
    w[:, :t, 0], w[:, :t, 1] = 1.0, 0.0
    tgt[:, :t, 1] = tgt[:, :t, 0]
    w = w / w.sum(-1, keepdim=True)
    return Reduction.from_targets(tgt, w)


kinds = st.sampled_from(["merge", "prune", "soft"])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 30), kind=kinds, seed=st.integers(0, 10_000))
def test_invariants(n, kind, seed):
    g = torch.Generator().manual_seed(seed)
    b, c = 3, 6
    red = random_reduction(g, b, n, kind)
    size = torch.rand(b, n, generator=g) + 0.5
    x = torch.randn(b, n, c, generator=g)
    y, s = red.apply(x, size)
    # sizes are conserved (pruning conserves the kept ones)
    kept_mass = (red.weight * size.unsqueeze(-1)).sum((1, 2))
    torch.testing.assert_close(s.sum(1), kept_mass)
    if kind != "prune":
        torch.testing.assert_close(s.sum(1), size.sum(1))
    # a constant input stays constant
    const = torch.randn(c, generator=g).expand(b, n, c)
    yc, _ = red.apply(const, size)
    torch.testing.assert_close(yc, const[:, : red.n_out], atol=1e-5, rtol=1e-5)
    # unmerge restores the grid shape, and merged tokens read back their destination
    back = red.unmerge(y)
    assert back.shape == x.shape
    if kind == "merge":
        torch.testing.assert_close(back, y.gather(1, red.index.expand(-1, -1, c)))
    # batch independence: each sample alone gives the same result
    for i in range(b):
        sub = Reduction(red.index[i : i + 1], red.weight[i : i + 1], red.rep[i : i + 1], red.mode)
        yi, si = sub.apply(x[i : i + 1], size[i : i + 1])
        torch.testing.assert_close(yi, y[i : i + 1])
        torch.testing.assert_close(si, s[i : i + 1])


def test_dense_reference_for_soft_map():
    """T applied sparsely equals the dense matrix formula Y = D^-1 T diag(s) X."""
    g = torch.Generator().manual_seed(0)
    b, n, c = 2, 10, 4
    red = random_reduction(g, b, n, "soft")
    x, size = torch.randn(b, n, c, generator=g), torch.rand(b, n, generator=g) + 0.1
    dense = torch.zeros(b, red.n_out, n)
    for bi in range(b):
        for i in range(n):
            for j in range(red.k):
                dense[bi, red.index[bi, i, j], i] += red.weight[bi, i, j]
    s_ref = dense @ size.unsqueeze(-1)
    y_ref = (dense * size.unsqueeze(1)) @ x / s_ref
    y, s = red.apply(x, size)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref.squeeze(-1))
    sum_red = Reduction(red.index, red.weight, red.rep, mode="sum")
    torch.testing.assert_close(sum_red.apply(x, size)[0], dense @ x)


def test_mlerp_rescales_to_largest_input_norm():
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    target = torch.tensor([[1, 1, 2]])  # token 0 merges into token 1
    red = Reduction.from_targets(target, mode="mlerp")
    y, s = red.apply(x)
    assert torch.allclose(y[0, 0].norm(), torch.tensor(3.0))
    assert torch.allclose(y[0, 0] / y[0, 0].norm(), torch.tensor([1.5, 0.5]) / 1.5811388)
    torch.testing.assert_close(y[0, 1], x[0, 2])
    torch.testing.assert_close(s, torch.tensor([[2.0, 1.0]]))


def test_compose_tracks_sources_and_positions():
    g = torch.Generator().manual_seed(3)
    b, n = 2, 16
    r1 = random_reduction(g, b, n, "merge")
    r2 = random_reduction(g, b, r1.n_out, "merge")
    both = r1.compose(r2)
    x = torch.randn(b, n, 3, generator=g)
    y_seq, s_seq = r2.apply(*r1.apply(x))
    y_one, s_one = Reduction(both.index, both.weight, both.rep).apply(x)
    torch.testing.assert_close(y_seq, y_one)
    torch.testing.assert_close(s_seq, s_one)
    assert torch.equal(both.rep, r1.rep.gather(1, r2.rep))


def test_variable_counts_pad_with_zero_size():
    target = torch.tensor([[1, 1, 2, 3], [0, 1, 2, 3]])  # sample 0 merges one token
    red = Reduction.from_targets(target)
    y, s = red.apply(torch.ones(2, 4, 2))
    assert red.n_out == 4
    torch.testing.assert_close(s, torch.tensor([[2.0, 1, 1, 0], [1, 1, 1, 1]]))
    assert torch.isfinite(y).all() and (y[0, 3] == 0).all()


def test_a_wrong_static_count_is_caught_in_eager_runs():
    """``kept`` lets compiled graphs skip reading the count; eager runs still check it."""
    target = torch.tensor([[0, 0, 2, 3], [0, 1, 1, 3]])  # 3 outputs each
    assert Reduction.from_targets(target, kept=3).n_out == 3
    assert Reduction.from_targets(target, kept=3).uniform
    with pytest.raises(ValueError, match="kept=2"):
        Reduction.from_targets(target, kept=2)
    uneven = torch.tensor([[0, 0, 2, 3], [0, 0, 0, 3]])
    with pytest.raises(ValueError, match="some sample keeps another count"):
        Reduction.from_targets(uneven, kept=3)
