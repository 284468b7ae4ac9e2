"""Evaluation tasks on tiny synthetic data, and the merge visualisation."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
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


def _slow_bootstrap_se(values, stat, resamples, seed):
    """The bootstrap from its definition: one resample at a time."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        sample = [values[rng.integers(len(values))] for _ in range(len(values))]
        stats.append(stat(np.array(sample)))
    mean = sum(stats) / len(stats)
    return (sum((s - mean) ** 2 for s in stats) / (len(stats) - 1)) ** 0.5


@pytest.mark.parametrize("seed", [0, 3])
def test_bootstrap_se_matches_a_slow_reference(seed):
    x = np.random.default_rng(seed + 10).beta(8, 1, size=57)  # skewed, like cosines near 1
    p05 = partial(np.percentile, q=5)
    want = _slow_bootstrap_se(x, lambda v: np.percentile(v, 5), 50, seed)
    assert M.bootstrap_se(x, p05, resamples=50, seed=seed) == pytest.approx(want, rel=1e-12)
    assert M.bootstrap_se(x, p05, resamples=50, seed=seed + 1) != pytest.approx(want, rel=1e-6)


def test_bootstrap_se_of_a_mean_is_the_standard_error():
    x = np.random.default_rng(1).normal(size=400)
    se = M.bootstrap_se(x, np.mean, resamples=2000)
    assert se == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)), rel=0.1)
    assert M.bootstrap_se(np.full(30, 0.9), np.mean) == pytest.approx(0.0, abs=1e-12)
    assert M.bootstrap_se(np.array([0.5]), np.mean) == 0.0


def test_table_flags_large_standard_errors():
    from tokenmerge.eval import report

    rows = [{"m": "a", "v": 0.95, "v_se": 0.005}, {"m": "b", "v": 0.8, "v_se": 0.04}]
    cols = [("m", "method"), (("v", "v_se"), "agree")]
    lines = report.table(rows, cols, {"v_se": 0.01}).splitlines()
    assert lines[2] == "| a | 0.950 ± 0.005 |"
    assert lines[3] == f"| b | 0.800 ± 0.040 {report.FLAG} |"
    assert lines[-1] == f"{report.FLAG} standard error above 0.01."
    assert report.FLAG not in report.table(rows[:1], cols, {"v_se": 0.01})
    assert report.FLAG not in report.table(rows, cols)


def _bench_rows(datasets, p05, down=None):
    """Rows of a vision run: ToMe at ``p05`` per dataset, downsampling at ``down`` (default the
    same)."""
    rows = []
    for j, (d, c) in enumerate(zip(datasets, p05, strict=True)):
        for method, budgets in (("tome", ("r=8", "r=16")), ("downsample", ("196px", "168px"))):
            at = down[j] if down and method == "downsample" else c
            for i, b in enumerate(budgets):
                rows.append(
                    {"model": "m", "backend": "hf", "dataset": d, "method": method, "budget": b,
                     "throughput_ratio": 1.2 + i, "cosine_p05": at - 0.01 * i,
                     "cosine_p05_se": 0.01, "agreement": 0.9, "agreement_se": 0.03,
                     "probe_acc": 0.8, "probe_drop_se": 0.02, "knn_acc": 0.7,
                     "knn_drop_se": 0.02}
                )  # fmt: skip
    return rows


def _vision_meta(datasets):
    from tokenmerge.eval import report

    base = {"n": 8, "classes": 3, "knn_acc": 0.7, "knn_acc_se": 0.1, "probe_acc": 0.75}
    return report.provenance(0, ["test"]) | {
        "config": {"datasets": datasets, "n": 8, "batch_size": 4, "tasks": ["cosine", "speed"]},
        "base": {d: base | {"probe_acc_se": 0.1 + i} for i, d in enumerate(datasets)},
    }


def test_vision_report_puts_the_hardest_dataset_first(tmp_path):
    from tokenmerge.eval import report
    from tokenmerge.eval.vision import hardest_first
    from tokenmerge.eval.vision.cli import ERRORS, PLOTTED, markdown

    datasets = ["photos", "textiles", "fashion-mnist"]
    rows = _bench_rows(datasets, [0.95, 0.90, 0.97])
    order = hardest_first(rows)
    assert order == ["textiles", "photos", "fashion-mnist"]
    md = markdown(rows, _vision_meta(datasets), order)
    assert "**Hardest dataset: textiles**" in md.splitlines()[2]
    heads = [md.index(f"## {d}") for d in order]
    assert heads == sorted(heads)
    # each table is under its own dataset's unreduced accuracies, and holds its rows only
    for i, d in enumerate(datasets):
        section = md[md.index(f"## {d}") :].split("\n## ")[0]
        assert f"probe 0.750 ± {0.1 + i:.3f}" in section
        assert section.count("| tome | r=") == 2 and section.count("| downsample | 1") == 2
    assert md.count(report.FLAG) > 1  # agreement SE 0.03 > 0.01: flagged, with a footnote
    out = tmp_path / "p.png"
    report.pareto_plot(
        rows, out, PLOTTED, "t", base={d: {"probe_acc": 0.8} for d in datasets},
        errors=ERRORS, by="dataset",
    )  # fmt: skip
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_the_hardest_dataset_is_the_methods_not_the_baselines():
    """Downsampling ruins Fashion-MNIST's small items; ToMe finds the textiles hardest."""
    from tokenmerge.eval.vision import hardest_first

    datasets = ["photos", "textiles", "fashion-mnist"]
    rows = _bench_rows(datasets, [0.95, 0.90, 0.99], down=[0.95, 0.95, 0.70])
    assert hardest_first(rows) == ["textiles", "photos", "fashion-mnist"]
    baselines_only = [r for r in rows if r["method"] == "downsample"]
    assert hardest_first(baselines_only)[0] == "fashion-mnist"


def test_report_remakes_a_saved_vision_run(tmp_path):
    """``tokenmerge report RUN.json``: the Markdown and the plot again, from the JSON alone."""
    from tokenmerge.cli.main import main
    from tokenmerge.eval import report

    datasets = ["photos", "textiles"]
    rows = _bench_rows(datasets, [0.95, 0.90], down=[0.97, 0.99])
    report.write_json(tmp_path / "run.json", _vision_meta(datasets), rows)
    assert main(["report", str(tmp_path / "run.json")]) == 0
    md = (tmp_path / "run.md").read_text()
    assert "**Hardest dataset: textiles**" in md and md.index("## textiles") < md.index("## photos")
    assert "At equal measured speed-up" in md  # the matched-speed table, made from the rows
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


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
