"""Evaluation tasks on tiny synthetic data, and the merge visualisation."""

from __future__ import annotations

import numpy as np
import torch
from models import images, make

import tokenmerge as tm
from tokenmerge.eval import metrics as M
from tokenmerge.eval.visualize import groups, overlay


def test_knn_reaches_100_percent_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(30)
    feats = centers[labels] + 0.1 * torch.randn(120, 16, generator=g)
    pred = M.knn_predict(feats, labels, k=20)
    assert (pred == labels).all()
    probe = M.probe_predict(feats.numpy(), labels.numpy(), [feats.numpy()])[0]
    assert (probe == labels.numpy()).all()


def test_knn_is_leave_one_out():
    # each point's only exact twin has a different label: leave-one-out must not see itself
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    pred = M.knn_predict(feats, labels, k=1)
    assert pred.tolist() == [1, 0, 1, 0]


def test_cosine_of_a_model_with_itself_is_one():
    model, run = make("hf-dinov2-sdpa")
    x = images()
    with torch.no_grad():
        a, b = run(model, x), run(model, x)
    np.testing.assert_allclose(M.cosine(a, b), 1.0, atol=1e-12)


def test_estimates_and_map_agreement():
    e = M.proportion(np.array([True, False, True, True]))
    assert e.value == 0.75 and abs(e.se - np.sqrt(0.75 * 0.25 / 4)) < 1e-12
    d = M.paired_difference(np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1]))
    assert d.value == 0.25
    m = torch.rand(3, 20, 20)
    np.testing.assert_allclose(M.pearson(m, m), 1.0)
    np.testing.assert_allclose(M.pearson(m, -m), -1.0)
    np.testing.assert_allclose(M.top_iou(m, m), 1.0)
    flipped = torch.flip(m.flatten(1).argsort(1), [1]).float().view(3, 20, 20)
    assert (
        M.top_iou(m.flatten(1).argsort(1).argsort(1).float().view(3, 20, 20), flipped) < 1
    ).all()


def test_overlay_paints_group_means_and_borders():
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[:2, :2] = 10
    img[:2, 2:] = 30
    img[2:] = 200
    gm = np.array([[0, 0], [1, 2]])  # the two top patches merged
    out = overlay(img, gm)
    assert out[0, 0].tolist() == [20, 20, 20]  # mean of 10 and 30
    assert out[2, 0].tolist() == [255, 255, 255]  # border with the group above
    assert out[3, 1].tolist() == [200, 200, 200]
    assert out[3, 2].tolist() == [255, 255, 255]  # border between groups 1 and 2


@torch.no_grad()
def test_groups_follow_the_source_map():
    model, run = make("timm-dinov2-like")
    with tm.patched(model, tm.ToMe(r=8)):
        run(model, images())
        st = tm.state(model)
    gm = groups(st)
    assert gm.shape == st.grid == (8, 8)
    # every group id is a current token; their count is what survived minus the prefix tokens
    assert len(np.unique(gm)) == int(st.counts[0]) - st.n_prefix
