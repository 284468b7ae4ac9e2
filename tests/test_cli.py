"""The CLI: a --quick bench smoke test on real weights, visualize, list, and bad input."""

from __future__ import annotations

import json

import pytest

from tokenmerge.cli.main import main

ROW_KEYS = {
    "model", "method", "params", "batch_size", "tokens_per_layer", "flops_ratio",
    "throughput_ratio", "cosine", "knn_acc", "knn_acc_base", "probe_acc", "probe_acc_base",
    "agreement", "cosine_p05", "saliency_r",
}  # fmt: skip


@pytest.mark.real
def test_bench_quick_writes_json_markdown_and_plot(tmp_path):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--name", "q"]) == 0
    res = json.loads((tmp_path / "q.json").read_text())
    assert {"versions", "seed", "machine", "command"} <= set(res["meta"])
    rows = res["rows"]
    # ToMe at 2 budgets, then the baselines: random pruning at the same budgets, and
    # downsampling to 196 and 168 px (2 and 4 patches fewer per side in quick mode)
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("tome", "r=8"), ("tome", "r=16"), ("random", "r=8"), ("random", "r=16"),
        ("downsample", "196px"), ("downsample", "168px"),
    ]  # fmt: skip
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert 0 < row["flops_ratio"] < 1 and row["throughput_ratio"] > 0
        assert len(row["tokens_per_layer"]) == 12
        assert 0.5 < row["cosine"] <= 1 and 0 <= row["agreement"] <= 1
    for row, side in zip(rows[4:], (14, 12), strict=True):
        assert row["tokens_per_layer"] == [side * side + 1.0] * 12
        assert "vs_downsample_cosine_p05" not in row
    for row in rows[:4]:  # set against downsampling where its speed lies in the ladder's range
        speeds = sorted(r["throughput_ratio"] for r in rows[4:])
        inside = speeds[0] <= row["throughput_ratio"] <= speeds[-1]
        assert (row["vs_downsample_cosine_p05"] is not None) == inside
    assert (tmp_path / "q.md").read_text().startswith("# tokenmerge bench")
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.real
def test_visualize_writes_png(tmp_path):
    from tokenmerge.eval import data

    name, img = data.photos()[0]
    src = tmp_path / f"{name}.png"
    img.save(src)
    out = tmp_path / "v.png"
    assert main(["visualize", str(src), "--budget", "16", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tome" in out and "timm-vit" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["bench", "--methods", "nope"], "unknown method 'nope'"),
        (["bench", "--budgets", "x"], "cannot parse budget 'x'"),
    ],
)
def test_bad_cli_input(argv, match, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code, msg = 2, str(e)
    else:
        msg = capsys.readouterr().err
    assert code == 2 and match in msg
