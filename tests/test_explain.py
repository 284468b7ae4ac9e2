"""Timings a reader can trust and reports that explain themselves: the interquartile range and
"within noise" of a timing, the load other processes put on the machine, the plain-language
summary, the glossary."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tokenmerge.eval import cpuload
from tokenmerge.eval.throughput import Timing, interleave
from tokenmerge.eval.vision import explain


def _quartiles(xs: list[float]) -> tuple[float, float]:
    """Reference: linear interpolation between order statistics at (n-1)/4 and 3(n-1)/4."""
    s = sorted(xs)

    def at(p: float) -> float:
        k = p * (len(s) - 1)
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return at(0.25), at(0.75)


@pytest.mark.parametrize(
    "ratios, noise",
    [
        ((1.30, 1.41, 1.25, 1.52, 1.38), False),
        ((0.97, 1.04, 1.01, 0.99, 1.10), True),
        ((0.80, 0.85, 0.90, 0.95, 1.20), False),  # slower beyond noise
        ((1.5, 1.1), False),
    ],
)
def test_timing_iqr_and_noise(ratios, noise) -> None:
    t = Timing(32, 1.0, 1.0, 1.0, ratios)
    q1, q3 = _quartiles(list(ratios))
    assert t.iqr == pytest.approx((q1, q3))
    assert t.within_noise is noise and t.within_noise == (q1 <= 1.0 <= q3)
    assert Timing(32, 1.0, 1.0, 1.0, (1.2,)).iqr is None
    assert not Timing(32, 1.0, 1.0, 1.0).within_noise


def test_other_load_subtracts_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"busy": 100.0, "own": 10.0, "wall": 50.0}
    monkeypatch.setattr(cpuload, "busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(cpuload.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(cpuload.time, "perf_counter", lambda: clock["wall"])
    with cpuload.OtherLoad() as load:
        clock.update(busy=103.0, own=11.0, wall=52.0)  # 3 s busy, 1 s of it ours, in 2 s
    assert load.cores == pytest.approx(1.0)
    monkeypatch.setattr(cpuload, "busy_seconds", lambda: None)
    with cpuload.OtherLoad() as unknown:
        pass
    assert unknown.cores is None


@pytest.mark.skipif(cpuload.busy_seconds() is None, reason="no /proc/stat on this system")
def test_a_busy_child_process_shows_as_load() -> None:
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # let it start
        with cpuload.OtherLoad() as load:
            time.sleep(1.0)
    finally:
        child.wait()
    assert load.cores is not None and load.cores > 0.5


def test_interleave_records_the_load() -> None:
    t = interleave(lambda: sum(range(1000)), lambda: sum(range(500)), 1, runs=3, warmup=1)
    assert len(t.ratios) == 3
    if cpuload.busy_seconds() is not None:
        assert t.other_load is not None and t.other_load >= 0


def _row(dataset, method, budget, speed, agree, **kw):
    return {
        "dataset": dataset, "method": method, "budget": budget, "throughput_ratio": speed,
        "throughput_iqr": (speed - 0.05, speed + 0.04), "agreement": agree, "cosine": 0.99,
        "within_noise": False, "other_load": 0.0,
    } | kw  # fmt: skip


def test_summary_recommends_the_fastest_faithful_method_setting() -> None:
    rows = [
        _row("photos", "tome", "r=8", 1.30, 0.99),
        _row("photos", "tome", "r=16", 1.62, 0.97, vs_downsample_agreement=0.02),
        _row("photos", "tome", "r=20", 1.90, 0.93),
        _row("photos", "downsample", "168px", 2.10, 0.99),  # a baseline: never recommended
        _row("photos", "evit", "r=20", 2.00, 0.98, within_noise=True),  # not shown faster
        _row("textiles", "tome", "r=8", 1.30, 0.89),
        _row("textiles", "tome", "r=16", 1.70, 0.82),
    ]
    text = explain.summary(rows, ["textiles", "photos"])
    lines = text.strip().splitlines()
    assert lines[-2] == (
        "- textiles: nothing keeps 95%; the most faithful is tome r=8: 1.30× faster "
        "(IQR 1.25–1.34), 89% of the probe's decisions unchanged, CLS cosine 0.990."
    )
    assert lines[-1] == (
        "- photos: tome r=16: 1.62× faster (IQR 1.57–1.66), 97% of the probe's decisions "
        "unchanged, CLS cosine 0.990; a smaller input at the same speed keeps 95%."
    )
    assert explain.recommend([_row("x", "tome", "r=4", 0.98, 1.0)]) == (None, False)


def test_load_warning_and_timing_note() -> None:
    quiet = [_row("a", "tome", "r=8", 1.3, 0.9, other_load=0.05)]
    assert explain.load_warning(quiet) == "" and explain.timing_note(quiet[0]) == ""
    busy = [*quiet, _row("a", "tome", "r=16", 1.5, 0.9, other_load=0.9, within_noise=True)]
    assert "other processes took up to 0.90 cores" in explain.load_warning(busy)
    assert explain.timing_note(busy[1]) == "within noise, loaded (0.90 cores)"


def test_glossary_defines_every_column() -> None:
    import re

    from tokenmerge.eval.vision.cli import COLUMNS

    terms = {
        t for bold in re.findall(r"\*\*(.+?)\*\*", explain.GLOSSARY) for t in bold.split(" / ")
    }
    for _, header in COLUMNS:
        if header in ("method", "budget"):
            continue
        # "cos p05 vs downsampling" is defined under "vs downsampling"
        assert header in terms or "vs " + header.split(" vs ")[-1] in terms, header


def test_bench_times_fixed_count_rows_once_and_dynamic_ones_per_dataset(monkeypatch) -> None:
    """ToMe, random pruning and downsampling run as fast on any image: timed on the first
    dataset only. DToMe's counts follow the image: timed on each. Progress covers both."""
    import numpy as np
    import timm
    import torch

    from tokenmerge.eval import zoo
    from tokenmerge.eval.vision import measure

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=2,
        dynamic_img_size=True,
    ).eval()  # fmt: skip
    vm = zoo.VisionModel("tiny", model, 64, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, "timm", 16)
    monkeypatch.setattr(zoo, "load_vision", lambda name, backend: vm)

    def images(name, n, seed):
        rng = np.random.default_rng(len(name))
        return [rng.integers(0, 255, (64, 64, 3), np.uint8) for _ in range(n)], np.arange(n) % 2

    monkeypatch.setattr(measure, "load_dataset", images)
    monkeypatch.setattr(measure, "_calibration_images", lambda name, cfg: images(name, 8, 1)[0])
    timed = []

    def fake_interleave(base, other, batch_size, runs, warmup, between=None):
        timed.append(between)
        return Timing(batch_size, 2.0, 1.0, 2.0, (1.9, 2.0, 2.1), 0.0)

    monkeypatch.setattr(measure, "interleave", fake_interleave)
    cfg = measure.VisionBenchConfig(
        model="tiny", backend="timm", methods=("tome", "dtome"), budgets=(2,),
        datasets=("textiles", "photos"), n=16, batch_size=4, timing_runs=3,
        downsample_steps=(1,), tasks=frozenset({"cosine", "speed"}),
    )  # fmt: skip
    seen, total, phases = [], [], []
    out = measure.run(cfg, seen.append, total.append, phases.append)
    assert phases == ["loading tiny", "textiles: quality", "textiles: timing", "photos: quality",
                      "photos: timing"]  # fmt: skip
    rows = {(r["dataset"], r["method"]): r for r in out["rows"]}
    assert set(rows) == {(d, m) for d in cfg.datasets for m in ("tome", "dtome", "random",
                                                                "downsample")}  # fmt: skip
    # 4 rows timed on textiles, then dtome again on photos
    assert len(timed) == 5
    assert all(rows[d, "tome"]["throughput_iqr"] == (1.95, 2.05) for d in cfg.datasets)
    per_row = 2 * (measure.TIMING_WARMUP + 3) * 4
    assert total == [16 * 2 * 5 + 5 * per_row] and sum(seen) == total[0]
