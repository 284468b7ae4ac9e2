"""The VLM bench end to end on a tiny random LLaVA (16 visual tokens per image) with a fake
input builder: the JSON fields, token counts as the runtime saw them, the unreduced row, the
report, and the CLI's refusals before any model loads."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from vlm_models import FakeInputs, half_right, make, visual_seen

import tokenmerge as tm
from tokenmerge.cli.main import main
from tokenmerge.eval.vlm import bench as vb
from tokenmerge.eval.vlm.cli import render, write
from tokenmerge.eval.vlm.scenes import KINDS

N_IMAGE = FakeInputs.n_image_tokens


@pytest.fixture(scope="module")
def setup():
    model, _ = make("llava")
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 32, 32, generator=g) for _ in range(5)]
    items = [
        {"id": i, "scene": i % 5, "image": i % 5, "kind": KINDS[i % 5],
         "question": f"q{i} {KINDS[i % 5]}", "answer": "?"}
        for i in range(10)
    ]  # fmt: skip
    inputs = FakeInputs()
    batch = inputs.batch([images[it["image"]] for it in items], [it["question"] for it in items])
    half_right(model, inputs, batch, items)
    cfg = vb.VLMBenchConfig(
        model="tiny-llava", methods=("random_proj", "downsample_proj", "fastv"), keeps=(8,),
        n=10, batch_size=4, max_new_tokens=2, decode_tokens=2, timing_runs=1, timing_warmup=0,
        n_image=N_IMAGE,
    )  # fmt: skip
    steps = []
    result = vb.run(cfg, steps.append, loaded=(model, inputs), data=(images, items))
    return model, inputs, images, items, cfg, result, steps


def test_rows_and_fields(setup):
    _, _, _, items, cfg, result, steps = setup
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["unreduced", "random_proj", "downsample_proj", "fastv"]
    assert sum(steps) == vb.planned_steps(cfg)
    base = rows[0]
    assert base["acc"] == pytest.approx(0.5)
    assert base["pct_full"] == pytest.approx(100.0) and base["agreement"] == 1.0
    assert base["tokens"] == N_IMAGE and base["flops_ratio"] == pytest.approx(1.0)
    assert base["kv_ratio"] == pytest.approx(1.0)
    for r in rows[1:]:
        for key in ("acc", "acc_se", "pct_full", "agreement", "agreement_se", "tokens",
                    "kv_mb", "flops_ratio", "ttft_ratio", "ttft_iqr", "decode_ratio", "site",
                    *(f"acc_{k}" for k in KINDS)):  # fmt: skip
            assert r[key] is not None, key
        assert r["keep"] == 8 and r["ratio"] == pytest.approx(0.5)
        assert len(r["answers"]) == len(items)
        assert 0 < r["flops_ratio"] < 1 and r["kv_ratio"] < 1
    assert rows[1]["tokens"] == 8  # random pruning keeps exactly its budget
    assert rows[3]["site"] == "decoder" and rows[3]["tokens_mean_layers"] > rows[3]["tokens"]
    assert result["n_by_type"] == dict.fromkeys(KINDS, 2)


def test_tokens_are_what_the_runtime_saw(setup):
    model, inputs, images, items, _, result, _ = setup
    batches = [inputs.batch([images[it["image"]]], [it["question"]]) for it in items]
    for row in result["rows"][1:]:
        seen = visual_seen(model, tm.get_method(row["method"], ratio=row["ratio"]), batches)
        assert row["tokens"] == pytest.approx(sum(seen) / len(seen)), row["method"]


def test_batches_hold_one_prompt_length(setup):
    model, inputs, images, items, cfg, _, _ = setup
    from tokenmerge.eval.vlm.measure import Measurer

    m = Measurer(cfg, model, inputs, images, items, lambda k: None)
    batches = m.batches()
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for b in batches:
        assert len(b) <= cfg.batch_size
        assert len({m._batch([items[i]])["input_ids"].shape[1] for i in b}) == 1


def test_report_written_and_remade(setup, tmp_path):
    *_, cfg, result, _ = setup
    args = argparse.Namespace(out=str(tmp_path), name="vlm")
    write(args, cfg, result)
    saved = json.loads((tmp_path / "vlm.json").read_text())
    meta = saved["meta"]
    assert meta["config"]["bench"] == "vlm" and meta["config"]["keeps"] == [8]
    assert len(meta["questions"]) == 10 and {"versions", "machine", "seed"} <= set(meta)
    md = (tmp_path / "vlm.md").read_text()
    assert "8 visual tokens kept" in md and "Does counting suffer most from merging?" in md
    assert "breaks first" in md or "No question type breaks" in md
    assert (tmp_path / "vlm.png").stat().st_size > 0
    (tmp_path / "vlm.md").unlink()
    assert render(tmp_path / "vlm.json") == [".md", ".png"]
    assert (tmp_path / "vlm.md").read_text().split("Generated")[0] == md.split("Generated")[0]
    assert main(["report", str(tmp_path / "vlm.json")]) == 0


def test_winners_ignore_types_answered_at_chance():
    from tokenmerge.eval.vlm.report import measured_accuracy, winners

    n_by = dict.fromkeys(KINDS, 20)
    chance = {"colour": 1 / 6, "shape": 0.25, "count": 0.2, "position": 0.5, "class": 0.1}

    def row(method, per, keep=57):
        acc = sum(per.values()) / len(per)
        return {"method": method, "keep": keep, "acc": acc, "acc_se": 0.02, "agreement": 0.8,
                "flops_ratio": 0.3, **{f"acc_{k}": v for k, v in per.items()}}  # fmt: skip

    base = row("unreduced", {"colour": 0.4, "shape": 0.5, "count": 0.5, "position": 0.5,
                             "class": 0.1}, keep=256)  # fmt: skip
    # "lucky" is ahead overall only through the two types the unreduced model guesses
    lucky = row("lucky", {"colour": 0.2, "shape": 0.3, "count": 0.3, "position": 0.9,
                          "class": 0.9})  # fmt: skip
    good = row("good", {"colour": 0.4, "shape": 0.5, "count": 0.45, "position": 0.5,
                        "class": 0.1})  # fmt: skip
    assert lucky["acc"] > good["acc"]
    text = winners([base, lucky, good], chance, n_by)
    assert "**57 tokens**: good" in text and "position, class left out" in text
    assert "**57 tokens**: lucky" in winners([base, lucky, good])  # overall accuracy
    p, se = measured_accuracy(good, ["colour", "shape", "count"], n_by)
    assert p == pytest.approx((0.4 + 0.5 + 0.45) / 3)
    assert se == pytest.approx((p * (1 - p) / 60) ** 0.5)


def test_breaks_first_names_measured_types_only():
    from tokenmerge.eval.vlm.report import breaks_first

    chance = {"colour": 1 / 6, "shape": 0.25, "count": 0.2, "position": 0.5, "class": 0.1}
    base = {"method": "unreduced", "keep": 256, "acc_colour": 0.4, "acc_shape": 0.5,
            "acc_count": 0.5, "acc_position": 0.5, "acc_class": 0.1}  # fmt: skip
    pct = {"colour": 50.0, "shape": 60.0, "count": 95.0, "position": 40.0, "class": 300.0}
    row = {"method": "m", "keep": 57, **{f"pct_{k}": v for k, v in pct.items()}}
    text = breaks_first([base, row], chance)
    assert text.startswith("**colour, shape** break first: at 57 tokens")
    assert "Never below 90%: count." in text and "Left out: position, class" in text


def test_questions_balanced():
    images, items = vb.make_questions(10, "test", seed=0)
    assert [sum(it["kind"] == k for it in items) for k in KINDS] == [2] * 5
    assert all(0 <= it["image"] < len(images) for it in items)
    assert vb.quotas(12) == {"colour": 3, "shape": 3, "count": 2, "position": 2, "class": 2}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "tome"], "accepted: "),
        (["--methods", "random_proj,nope"], "not a VLM method"),
        (["--methods", "frame_subsample"], "video clips only"),
        (["--budgets", "256"], "from 1 to 255"),
        (["--budgets", "0"], "from 1 to 255"),
        (["--budgets", "half"], "visual tokens kept per image"),
        (["--tasks", "needle"], "accepted"),
        (["--dataset", "photos"], "does not apply"),
    ],
)
def test_cli_refuses_before_loading(extra, message, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(tm.zoo, "load", boom)
    assert main(["bench", "--model", "tiny-llava", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_hub_vlm(capsys):
    assert main(["bench", "--model", "hf:some/vlm", "--kind", "vlm"]) == 2
    assert "tiny-llava" in capsys.readouterr().err
