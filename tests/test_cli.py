"""The CLI: a --quick bench smoke test on real weights, visualize, list, and bad input."""

from __future__ import annotations

import json

import pytest

from tokenmerge.cli.main import main

ROW_KEYS = {
    "model", "method", "params", "batch_size", "tokens_per_layer", "flops_ratio",
    "throughput_ratio", "cosine", "knn_acc", "knn_acc_base", "probe_acc", "probe_acc_base",
    "agreement", "cosine_p05", "cosine_p05_se", "saliency_r", "dataset",
}  # fmt: skip


@pytest.mark.real
def test_bench_quick_writes_json_markdown_and_plot(tmp_path):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--name", "q"]) == 0
    res = json.loads((tmp_path / "q.json").read_text())
    meta = res["meta"]
    assert {"versions", "seed", "machine", "command"} <= set(meta)
    datasets = meta["config"]["datasets"]
    assert len(datasets) >= 2 and set(meta["base"]) == set(datasets)
    rows = res["rows"]
    assert [r["dataset"] for r in rows] == [d for d in datasets for _ in range(6)]
    for d in datasets:
        mine = [r for r in rows if r["dataset"] == d]
        assert 0 <= meta["base"][d]["probe_acc"] <= 1
        check_dataset_rows(mine)
        assert all(r["probe_acc_base"] == meta["base"][d]["probe_acc"] for r in mine)
    # the hardest dataset: lowest mean cos p05 over its method rows (ToMe: the first two),
    # named first in the report
    p05 = {d: sum(r["cosine_p05"] for r in rows[i * 6 : i * 6 + 2]) for i, d in enumerate(datasets)}
    assert meta["hardest_dataset"] == min(p05, key=p05.get)
    md = (tmp_path / "q.md").read_text()
    assert md.startswith("# tokenmerge bench")
    assert f"**Hardest dataset: {meta['hardest_dataset']}**" in md
    heads = [md.index(f"## {d}") for d in meta["datasets_hardest_first"]]
    assert heads == sorted(heads) and md.index(f"## {meta['hardest_dataset']}") == heads[0]
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    # it explains itself: what it buys first, a glossary last; timings carry their spread
    assert meta["config"]["preset"] == "quick"
    assert md.index("**What it buys.**") < heads[0] < md.index("## Glossary")
    assert all(r["throughput_iqr"][0] <= r["throughput_ratio"] <= r["throughput_iqr"][1]
               for r in rows)  # fmt: skip
    assert all(r["other_load"] is None or r["other_load"] >= 0 for r in rows)


def check_dataset_rows(rows: list[dict]) -> None:
    """One dataset's rows of the quick bench."""
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
        assert 0 <= row["cosine_p05_se"] < 0.2
    for row, side in zip(rows[4:], (14, 12), strict=True):
        assert row["tokens_per_layer"] == [side * side + 1.0] * 12
        assert "vs_downsample_cosine_p05" not in row
    speeds = sorted(r["throughput_ratio"] for r in rows[4:])  # this dataset's ladder only
    for row in rows[:4]:  # set against downsampling where its speed lies in the ladder's range
        inside = speeds[0] <= row["throughput_ratio"] <= speeds[-1]
        assert (row["vs_downsample_cosine_p05"] is not None) == inside
        assert (row["vs_downsample_agreement"] is not None) == inside


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
        (["bench", "--dataset", "photos,imagenet"], "accepted: textiles, photos, fashion-mnist"),
        (["bench", "--autotune", "0.5"], "speed-ups above 1 (e.g. 1.5, 2), got [0.5]"),
        (["bench", "--autotune", "2x"], "speed-ups above 1, e.g. 1.5,2; got '2x'"),
        (["bench", "--autotune", "2", "--autotune-methods", "dtome"], "accepted: "),
        (["bench", "--model", "minilm", "--autotune", "2"], "--autotune applies to vision"),
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


class _Stop(Exception):
    """Raised by a stand-in for the bench's run: carries the config it was given."""


@pytest.mark.parametrize(
    "flags, n, budgets, steps",
    [
        ([], 96, ["r=8", "r=16"], (2, 4)),
        (["--full"], 1000, ["r=8", "r=12", "r=16", "r=20"], (1, 2, 3, 4, 5, 6)),
        (["--quick"], 64, ["r=8", "r=16"], (2, 4)),
        (["--full", "--n", "500"], 500, ["r=8", "r=12", "r=16", "r=20"], (1, 2, 3, 4, 5, 6)),
    ],
)
def test_bench_presets(monkeypatch, tmp_path, flags, n, budgets, steps):
    """The default main job is the quick look of minutes; --full the published size."""
    from tokenmerge.core.budget import budget_label
    from tokenmerge.eval.vision import cli as vision_cli

    def stop(cfg, *args):
        raise _Stop(cfg)

    monkeypatch.setattr(vision_cli, "run", stop)
    with pytest.raises(_Stop) as e:
        main(["bench", *flags, "--out", str(tmp_path)])
    cfg = e.value.args[0]
    assert cfg.n == n and [budget_label(b) for b in cfg.budgets] == budgets
    assert tuple(cfg.downsample_steps) == steps and cfg.timing_runs == (3 if "--quick" in flags
                                                                          else 5)  # fmt: skip


def test_full_is_for_vision_and_not_with_quick(capsys):
    with pytest.raises(SystemExit, match="--full and --quick exclude each other"):
        main(["bench", "--full", "--quick"])
    with pytest.raises(SystemExit, match="--full applies to vision benchmarks, not to text"):
        main(["bench", "--model", "minilm", "--full"])
