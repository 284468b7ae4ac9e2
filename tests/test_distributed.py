"""``tokenmerge bench`` under ``torchrun``: the ranks share the work, and every number but the
timings equals the single-process run's (real DINOv2-S weights, 2 CPU processes on gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmerge.cli.main import main
from tokenmerge.eval.distributed import Group, group, launched

#: what only a timing decides: the speed columns, the comparisons at equal measured speed,
#: and the rank that took the timing
TIMING = {
    "throughput_ratio",
    "throughput_spread",
    "throughput_iqr",
    "within_noise",
    "other_load",
    "base_items_per_s",
    "items_per_s",
    "timing_rank",
    "vs_downsample_cosine_p05",
    "vs_downsample_agreement",
    "vs_tome_cosine_p05",
    "vs_tome_agreement",
}

#: two data sets (static rows timed on the first and reused on the second, the dynamic DToMe
#: timed on each), a calibrated method, a baseline and the saliency maps
BENCH = [
    "bench",
    "--model",
    "dinov2-s",
    "--dataset",
    "textiles,photos",
    "--samples",  # not --n: torchrun's own parser takes it for one of its options
    "24",
    "--batch-size",
    "8",
    "--methods",
    "tome,dtome",
    "--budgets",
    "8",
    "--baselines",
    "random",
    "--timing-runs",
    "1",
    "--saliency-images",
    "8",
]


def test_one_process_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched()
    with group() as g:
        assert (g.rank, g.world, g.main) == (0, 1, True)
        assert g.mine("abc") == [(0, "a"), (1, "b"), (2, "c")]
        assert g.merge({2: "c", 0: "a"}) == {0: "a", 2: "c"}


def test_round_robin_covers_every_item_once() -> None:
    items = list(range(11))
    shares = [Group(rank, 3).mine(items) for rank in range(3)]
    assert shares[1] == [(1, 1), (4, 4), (7, 7), (10, 10)]
    assert sorted(i for share in shares for i, _ in share) == items
    assert [Group(0, 3).owner(i) for i in range(5)] == [0, 1, 2, 0, 1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--model", "whisper-tiny-en"], "run the audio benchmark in one process"),
        (["bench", "--model", "minilm"], "run the text benchmark in one process"),
        (["list"], "`tokenmerge list` runs in one process"),
    ],
)
def test_launcher_refuses_what_it_cannot_share(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _rows(path: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in json.loads(path.read_text())["rows"]
    ]


def test_two_ranks_give_the_single_process_numbers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "tokenmerge", *BENCH, "--out", str(one), "--name", "run"],
        check=True,
        env=env,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    subprocess.run(
        [*torchrun, "2", "-m", "tokenmerge", *BENCH, "--out", str(two), "--name", "run"],
        check=True,
        env=env,
    )
    assert sorted(p.name for p in two.iterdir()) == ["run.json", "run.md", "run.png"]
    a, b = _rows(one / "run.json"), _rows(two / "run.json")
    assert len(a) == 2 * 3  # tome, dtome, random, on two data sets
    assert a == b  # features, token counts, FLOPs, accuracies, probes, saliency: bit-equal
    saved = json.loads((two / "run.json").read_text())
    single = json.loads((one / "run.json").read_text())
    assert saved["meta"]["base"] == single["meta"]["base"]
    assert [m["rank"] for m in saved["meta"]["ranks"]] == [0, 1]
    assert "ranks" not in single["meta"] and "timing_rank" not in single["rows"][0]
    # every row timed, each by one rank; both ranks took a share
    ranks = [r["timing_rank"] for r in saved["rows"]]
    assert all(r["throughput_ratio"] > 0 for r in saved["rows"]) and set(ranks) == {0, 1}
    # a static row's timing is reused on the second data set, DToMe's is taken again
    first, second = saved["rows"][:3], saved["rows"][3:]
    for x, y in zip(first, second, strict=True):
        same = x["throughput_ratio"] == y["throughput_ratio"]
        assert same == (x["method"] != "dtome"), x["method"]
    md = (two / "run.md").read_text()
    assert "Run on 2 ranks" in md and "rank 1" in md and "2 ranks (rank 0:" in md


def _tiny_llm_folder(folder: Path) -> Path:
    """The LLM bench tests' tiny random Llama and chat-template tokenizer, saved as a
    ``hf:`` folder for the bench's subprocesses."""
    from tests.test_llm_bench import _text, chat_tokenizer, tiny_lm
    from tokenmerge.eval import corpora

    tok = chat_tokenizer(_text(), corpora.text("austen")[:20000])
    tiny_lm(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_two_ranks_share_the_llm_trials(tmp_path: Path) -> None:
    """The trials shared by two ranks and merged in order give the single process's answers,
    NLLs, cache sizes and cross-checks; the timings run on rank 0."""
    model = _tiny_llm_folder(tmp_path / "lm")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    args = ["bench", "--model", f"hf:{model}", "--kind", "llm", "--quick", "--dataset", "austen"]
    args += ["--methods", "snapkv,tova", "--tasks", "needle,ppl,speed", "--name", "run"]
    args += ["--samples", "3"]  # trials per length
    for p in ("lengths=96", "speed_length=96", "continuation=32", "chunk=32"):
        args += ["--param", f"bench.{p}"]
    args += ["--param", "bench.decode_tokens=2", "--param", "snapkv.window=8"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "tokenmerge", *args, "--out", str(one)], check=True, env=env
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    subprocess.run(
        [*torchrun, "2", "-m", "tokenmerge", *args, "--out", str(two)], check=True, env=env
    )
    a, b = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert len(a["rows"]) == len(b["rows"]) == 8  # snapkv, tova; 2x, 8x; one-shot, chunked
    timing = ("prefill_time", "prefill_ratio", "prefill_ratio_lo", "prefill_ratio_hi")
    for x, y in zip(a["rows"], b["rows"], strict=True):
        assert x.keys() == y.keys()
        for k in x.keys() - {*timing, "decode_ratio", "other_load"}:
            if k.startswith("ppl"):  # a rank's one thread sums some logits in another order
                assert y[k] == pytest.approx(x[k], rel=1e-4), k
            else:  # answers, needle scores, cache sizes and kept fractions: bit-equal
                assert y[k] == x[k], k
    for k in ("base", "check", "trials"):
        assert a["meta"][k] == b["meta"][k], k
    assert a["meta"]["base"]["trials"] == 3 and a["meta"]["check"]["checks"] > 0
    assert [m["rank"] for m in b["meta"]["ranks"]] == [0, 1]
    assert all(r["prefill_ratio"] > 0 for r in b["rows"])
    assert "the trials ran on 2 ranks" in (two / "run.md").read_text()
