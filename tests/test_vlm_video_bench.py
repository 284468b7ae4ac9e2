"""The VLM bench's video task (``--tasks video``) end to end on a tiny random LLaVA with
2-frame clips (16 visual tokens per frame) and a fake input builder: rows per method x budget,
budgets as the % of each clip's tokens, per-type accuracies over the clips' question types,
the report and its re-rendering; then the configuration, its refusals before any model loads,
and the balanced clip questions."""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest
import torch
from vlm_models import FakeInputs, half_right, make, visual_seen

import tokenmerge as tm
from tokenmerge.cli.main import build_parser, main
from tokenmerge.eval.vlm import bench as vb
from tokenmerge.eval.vlm import clips as vc
from tokenmerge.eval.vlm.cli import _config_json, config, render, write
from tokenmerge.eval.vlm.clips import CLIP_KINDS

N_IMAGE, FRAMES = FakeInputs.n_image_tokens, 2
N_CLIP = N_IMAGE * FRAMES
METHODS = ("frame_subsample", "random_proj", "downsample_proj", "fastv")
PCTS = (50, 25)


@pytest.fixture(scope="module")
def setup():
    model, _ = make("llava")
    g = torch.Generator().manual_seed(0)
    clips = [[torch.randn(3, 32, 32, generator=g) for _ in range(FRAMES)] for _ in range(5)]
    items = [
        {"id": i, "clip": i % 5, "video": i % 5, "kind": CLIP_KINDS[i % 5],
         "question": f"q{i} {CLIP_KINDS[i % 5]}", "answer": "?"}
        for i in range(10)
    ]  # fmt: skip
    inputs = FakeInputs()
    batch = inputs.clips([clips[it["video"]] for it in items], [it["question"] for it in items])
    half_right(model, inputs, batch, items)  # accuracy 0.5 per type
    cfg = vb.VLMBenchConfig(
        model="tiny-llava", tasks=frozenset({"video"}), methods=METHODS, keeps=PCTS,
        frames=FRAMES, n=10, batch_size=4, max_new_tokens=2, decode_tokens=2, timing_runs=1,
        timing_warmup=0, n_image=N_IMAGE,
    )  # fmt: skip
    steps = []
    result = vb.run(cfg, steps.append, loaded=(model, inputs), data=(clips, items))
    return model, inputs, clips, items, cfg, result, steps


def test_rows_per_method_and_budget(setup):
    _, _, _, items, cfg, result, steps = setup
    rows = result["rows"]
    assert [(r["method"], r["keep"]) for r in rows] == [
        ("unreduced", 100),
        *itertools.product(METHODS, PCTS),
    ]
    assert sum(steps) == vb.planned_steps(cfg)
    assert result["n_by_type"] == dict.fromkeys(CLIP_KINDS, 2)
    assert result["chance"] == vc.chance()
    base = rows[0]
    assert base["tokens"] == N_CLIP and base["keep_tokens"] == N_CLIP
    assert base["acc"] == pytest.approx(0.5) and base["flops_ratio"] == pytest.approx(1.0)
    for r in rows[1:]:
        per_type = [f"{s}_{k}" for s in ("acc", "pct") for k in CLIP_KINDS]
        for key in ("acc", "acc_se", "pct_full", "agreement", "tokens", "kv_mb", "flops_ratio",
                    "ttft_ratio", "ttft_iqr", "decode_ratio", "site", *per_type):  # fmt: skip
            assert r[key] is not None, (r["method"], key)
        assert r["ratio"] == pytest.approx(1 - r["keep"] / 100)
        assert r["budget"] == f"{r['keep']}%"
        assert r["keep_tokens"] == pytest.approx(r["keep"] * N_CLIP / 100)
        assert len(r["answers"]) == len(items)
        assert 0 < r["flops_ratio"] < 1 and r["kv_ratio"] < 1
    tokens = {(r["method"], r["keep"]): r["tokens"] for r in rows[1:]}
    # random pruning and FastV (from layer 2 on) keep exactly the % of the clip
    for m, pct in itertools.product(("random_proj", "fastv"), PCTS):
        assert tokens[m, pct] == pct * N_CLIP / 100, (m, pct)
    # frame subsampling keeps whole frames: 1 of 2 at 50%, and at least one at 25%
    assert tokens["frame_subsample", 50] == tokens["frame_subsample", 25] == N_IMAGE
    # per-frame pooling of each 4x4 grid: 3x3 at 50%, 2x2 at 25%, per frame
    assert tokens["downsample_proj", 50] == 9 * FRAMES
    assert tokens["downsample_proj", 25] == 4 * FRAMES


def test_tokens_are_what_the_runtime_saw_per_clip(setup):
    model, inputs, clips, items, _, result, _ = setup
    batches = [inputs.clips([clips[it["video"]]], [it["question"]]) for it in items]
    for row in result["rows"][1:]:
        seen = visual_seen(model, tm.get_method(row["method"], ratio=row["ratio"]), batches)
        assert row["tokens"] == pytest.approx(sum(seen) / len(seen)), row["method"]


def test_fixed_flops_count_every_frame(setup):
    from tokenmerge.eval.vlm.measure import fixed_flops

    model, _, clips, *_ = setup
    px = torch.stack(clips[0])
    one, two, three = (fixed_flops(model, px, f) for f in (1, 2, 3))
    assert two - one == pytest.approx(three - two) and two - one > 0


def test_report_written_and_remade(setup, tmp_path):
    *_, cfg, result, _ = setup
    write(argparse.Namespace(out=str(tmp_path), name="video"), cfg, result)
    meta = json.loads((tmp_path / "video.json").read_text())["meta"]
    assert meta["config"]["tasks"] == ["accuracy", "speed", "video"]
    assert meta["config"]["frames"] == FRAMES and meta["config"]["keeps"] == list(PCTS)
    assert len(meta["questions"]) == 10 and meta["chance"] == vc.chance()
    md = (tmp_path / "video.md").read_text()
    assert md.startswith("# tokenmerge bench: tiny-llava, video task (")
    assert "2-frame clips" in md and "32 per clip" in md
    assert "## 50% of the visual tokens kept (16 of 32 per clip)" in md
    assert "## 25% of the visual tokens kept (8 of 32 per clip)" in md
    assert "- **50% (16 tokens)**: " in md and "- **25% (8 tokens)**: " in md
    assert "| type | 50% (16 tokens) | 25% (8 tokens) |" in md
    for k in CLIP_KINDS:
        assert f"| {k} |" in md  # the retention table's rows
    assert "| start_colour | end_colour |" in md  # the per-type columns
    assert "Counting and merging" not in md and "| colour |" not in md
    assert (tmp_path / "video.png").stat().st_size > 0
    (tmp_path / "video.md").unlink()
    assert render(tmp_path / "video.json") == [".md", ".png"]
    assert (tmp_path / "video.md").read_text().split("Generated")[0] == md.split("Generated")[0]
    assert main(["report", str(tmp_path / "video.json")]) == 0
    assert (tmp_path / "video.md").read_text().split("Generated")[0] == md.split("Generated")[0]


def _rows(pcts: dict[str, dict[int, float]], base: dict[str, float]) -> list[dict]:
    rows = [{"method": "unreduced", "keep": 100, **{f"acc_{k}": v for k, v in base.items()}}]
    for keep in (50, 25):
        rows.append({"method": "m", "keep": keep,
                     **{f"pct_{k}": per[keep] for k, per in pcts.items()}})  # fmt: skip
    return rows


def test_breaks_first_and_winners_over_the_clips_kinds():
    from tokenmerge.eval.vlm.report import breaks_first, winners

    chance = vc.chance()  # change 1/3, motion 1/4, appeared 1/3, colours 1/6
    base = {"change": 0.9, "motion": 0.9, "appeared": 0.35, "start_colour": 0.8,
            "end_colour": 0.8}  # fmt: skip
    pcts = {"change": {50: 95, 25: 80}, "motion": {50: 70, 25: 50},
            "appeared": {50: 10, 25: 10}, "start_colour": {50: 99, 25: 99},
            "end_colour": {50: 99, 25: 95}}  # fmt: skip
    label = lambda k: f"{k}% ({k * 10} tokens)"  # noqa: E731
    text = breaks_first(_rows(pcts, base), chance, CLIP_KINDS, label)
    assert text.startswith("**motion** breaks first: at 50% (500 tokens) the median method")
    assert "Then: change at 25% (250 tokens)." in text
    assert "Never below 90%: start_colour, end_colour." in text
    assert "Left out: appeared" in text  # 0.35 is within 5 points of chance (1/3)

    n_by = dict.fromkeys(CLIP_KINDS, 10)

    def row(method, per, keep=50):
        acc = sum(per.values()) / len(per)
        return {"method": method, "keep": keep, "acc": acc, "acc_se": 0.02, "agreement": 0.8,
                "flops_ratio": 0.5, **{f"acc_{k}": v for k, v in per.items()}}  # fmt: skip

    full = row("unreduced", base, keep=100)
    # "lucky" is ahead overall only through the type the unreduced model guesses
    lucky = row("lucky", base | {"change": 0.5, "appeared": 1.0})
    good = row("good", base | {"change": 0.85, "appeared": 0.2})
    assert lucky["acc"] > good["acc"]
    text = winners([full, lucky, good], chance, n_by, CLIP_KINDS, label)
    assert "- **50% (500 tokens)**: good" in text and "appeared left out" in text


def test_questions_balanced_in_clip_order():
    clips, items = vb.make_clip_questions(12, "test", seed=0, frames=FRAMES)
    want = vb.quotas(12, CLIP_KINDS)
    assert want == {"change": 3, "motion": 3, "appeared": 2, "start_colour": 2, "end_colour": 2}
    assert {k: sum(it["kind"] == k for it in items) for k in CLIP_KINDS} == want
    assert [it["id"] for it in items] == list(range(12))
    # the reference: every clip's questions in clip order, the first of each type taken
    last = max(it["clip"] for it in items)
    made = [vc.make_clip(i, "test", 0, FRAMES) for i in range(last + 1)]
    ref, taken = [], dict.fromkeys(CLIP_KINDS, 0)
    for i, clip in enumerate(made):
        for q in clip.qas:
            if taken[q.kind] < want[q.kind]:
                taken[q.kind] += 1
                ref.append((i, q.kind, q.question, q.answer))
    assert [(it["clip"], it["kind"], it["question"], it["answer"]) for it in items] == ref
    assert len(clips) == len({it["clip"] for it in items})
    for it in items:  # the clip list holds the frames of the clip each question asks about
        frames = clips[it["video"]]
        assert len(frames) == FRAMES
        assert np.array_equal(np.asarray(frames[-1]), np.asarray(made[it["clip"]].frames[-1]))


def test_video_config_defaults(monkeypatch):
    cfg = vb.VLMBenchConfig(tasks=frozenset({"video"}))
    assert cfg.tasks == {"accuracy", "speed", "video"} and cfg.video
    assert cfg.keeps == (50, 25, 10, 5) and cfg.frames == 8 and cfg.kinds == CLIP_KINDS
    assert cfg.ratio(25) == 0.75 and cfg.tokens(25) == 512 and cfg.n_visual == 2048
    assert cfg.methods == tuple(m for m in vb.VIDEO_BENCH_METHODS if m in tm.REGISTRY)
    assert {"frame_subsample", "random_proj", "downsample_proj", "fastv"} <= set(cfg.methods)
    assert vb.VLMBenchConfig(tasks=frozenset({"video", "accuracy"})).tasks == {
        "video",
        "accuracy",
    }
    # a video method not registered yet stays out of the default, and is refused by name
    monkeypatch.setattr(vb, "VIDEO_BENCH_METHODS", (*vb.VIDEO_BENCH_METHODS, "not_yet"))
    assert "not_yet" not in vb.VLMBenchConfig(tasks=frozenset({"video"})).methods
    with pytest.raises(ValueError, match=r"'not_yet' is not a VLM method; accepted: .*fastv"):
        vb.validate(vb.VLMBenchConfig(tasks=frozenset({"video"}), methods=("not_yet",)))
    # the image bench is as it was: its defaults, and no video setting in its JSON
    image = vb.VLMBenchConfig()
    assert not image.video and image.tasks == vb.TASKS and image.keeps == vb.KEEPS
    assert image.methods == vb.METHODS and image.kinds == vb.KINDS
    assert "frames" not in _config_json(image) and "frames" in _config_json(cfg)


def _config(*argv: str):
    return config(build_parser().parse_args(["bench", "--model", "tiny-llava", *argv]))


def test_cli_config():
    cfg = _config("--task", "video", "--budgets", "50,12.5", "--param", "bench.frames=4")
    assert cfg.video and cfg.keeps == (50, 12.5) and cfg.frames == 4
    assert cfg.ratio(12.5) == pytest.approx(0.875) and cfg.tokens(12.5) == 128
    quick = _config("--tasks", "video", "--quick")
    assert quick.methods == ("frame_subsample", "random_proj", "fastv")
    assert quick.keeps == (25,) and quick.n == 10 and quick.timing_runs == 1
    assert quick.frames == 8 and quick.tasks == {"accuracy", "speed", "video"}
    only = _config("--tasks", "video,accuracy", "--methods", "frame_subsample,dart")
    assert only.tasks == {"video", "accuracy"} and only.methods == ("frame_subsample", "dart")
    image = _config("--quick")  # the image bench's own preset
    assert not image.video and image.keeps == (57,) and "frame_subsample" not in image.methods


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "0"], "above 0 and below 100"),
        (["--budgets", "100"], "above 0 and below 100"),
        (["--budgets=-5"], "above 0 and below 100"),
        (["--budgets", "50,150"], "got 150"),
        (["--budgets", "half"], "% of each clip's visual tokens kept"),
        (["--methods", "tome"], "not a VLM method; accepted: "),
        (["--methods", "random_proj,nope"], "'nope' is not a VLM method"),
        (["--param", "bench.frames=1"], "from 2 to 32"),
        (["--param", "bench.frames=33"], "from 2 to 32"),
        (["--param", "bench.frames=2.5"], "from 2 to 32"),
        (["--tasks", "video,needle"], "accepted: accuracy, speed, video"),
    ],
)
def test_cli_refuses_before_loading(extra, message, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(tm.zoo, "load", boom)
    argv = ["bench", "--model", "tiny-llava", *extra]
    if not any(a.startswith("--tasks") for a in extra):
        argv += ["--tasks", "video"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "frame_subsample"], "video clips only"),
        (["--param", "bench.frames=8"], "applies to --tasks video only"),
        (["--budgets", "12.5"], "visual tokens kept per image"),
    ],
)
def test_image_bench_still_refuses(extra, message, monkeypatch, capsys):
    monkeypatch.setattr(tm.zoo, "load", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["bench", "--model", "tiny-llava", *extra]) == 2
    assert message in capsys.readouterr().err
