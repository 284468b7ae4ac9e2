"""Whisper on real weights (``whisper-tiny-en``) and real speech, and the Whisper bench.

The real tests read the pocketsphinx-testdata utterances and a few espeak-ng clips
(``scripts/setup.sh`` installs both); they check what the bench then measures at scale:
budget 0 changes no generated token, merging to a quarter of the encoder tokens keeps the
transcripts, and DToMe calibrated on speech gives silence-heavy clips fewer tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tokenmerge as tm
from tokenmerge.eval.audio import speech_clips, wer
from tokenmerge.eval.audio.bench import (
    AudioBenchConfig,
    budget,
    features,
    make_method,
    scores,
    validate,
)
from tokenmerge.eval.audio.data import Clip
from tokenmerge.eval.audio.truncate import Truncate

# --------------------------------------------------------------------------------------------
# Without weights
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_truncate_keeps_the_earliest_tokens_against_a_loop():
    from tokenmerge.core.state import Signals, TokenState

    x = torch.randn(3, 12, 4)
    protected = torch.zeros(3, 12, dtype=torch.bool)
    protected[1, 11] = True  # a protected late token stays
    st = TokenState.start(x, protected)
    red = Truncate(r=5).reduce(Signals(x=x, k=None, q=None, scale=1.0), st, 5, 0)
    y = st.reduce(x, red)
    for b in range(3):
        keep = [i for i in range(12) if protected[b, i]]
        keep = sorted(keep + [i for i in range(12) if i not in keep][: 12 - 5 - len(keep)])
        torch.testing.assert_close(y[b], x[b, keep])
        assert st.pos[b].tolist() == keep


def test_budgets_reach_the_tokens_kept():
    from tokenmerge.core.flops import CostModel

    cost = CostModel(depth=4, dim=384, mlp_dim=1536)
    for keep in (750, 375, 188, 94):
        rs = budget("tome", keep, 4).schedule(1500, 0, cost, tm.ToMe().max_r)
        assert abs(1500 - sum(rs) - keep) <= 2, (keep, rs)
        assert budget("truncate", keep, 4) == [1500 - keep, 0, 0, 0]


def _clip(text: str, source: str = "librivox") -> Clip:
    return Clip(name=text, source=source, text=text, audio=np.zeros(16000, np.float32))


def test_scores_against_hand_counts():
    clips = [_clip("a b c d"), _clip("e f", "espeak")]
    got = scores(clips, ["a b x d", "e f g"], ["a b c d", "e f g"], seed=0)
    assert got["wer"] == pytest.approx(2 / 6)  # one substitution, one insertion
    assert got["wer_real"] == pytest.approx(1 / 4) and got["wer_espeak"] == pytest.approx(1 / 2)
    assert got["agreement"] == pytest.approx(0.5)
    assert got["wer_vs_unreduced"] == pytest.approx(1 / 7)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(methods=("m3",)), "accepted: .*tome.*truncate"),
        (dict(methods=("nope",)), "unknown or unsupported"),
        (dict(keeps=(50,)), "from 94"),
        (dict(keeps=(1500,)), "to 1499"),
        (dict(n=1), "--n must be"),
        (dict(model="minilm"), "runs on whisper-tiny-en"),
        (dict(method_params={"gtp": {"alpha": 0.5}}), "not benchmarked"),
    ],
)
def test_bad_configurations_are_refused_by_name(change, match):
    cfg = AudioBenchConfig(**change)
    with pytest.raises(ValueError, match=match):
        validate(cfg)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--budgets", "half"], "tokens kept after the encoder"),
        (["--tasks", "video"], "--tasks does not apply"),
        (["--param", "bench.frames=8"], "frames"),
        (["--methods", "tome,fastv"], "unknown or unsupported"),
    ],
)
def test_cli_bad_input_fails_before_loading(argv, match):
    out = subprocess.run(
        [sys.executable, "-m", "tokenmerge.cli.main", "bench", "--model", "whisper-tiny-en", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert match.replace("\\", "") in out.stderr or __import__("re").search(match, out.stderr)


# --------------------------------------------------------------------------------------------
# Real weights, real speech
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper():
    return tm.zoo.load("whisper-tiny-en")


@pytest.fixture(scope="module")
def real_clips():
    return speech_clips(10, sources=("librivox", "cards"))


def _transcribe(model, processor, feats):
    with torch.no_grad():
        out = model.generate(feats, max_new_tokens=64, do_sample=False)
    return out, [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.real
def test_whisper_tiny_en_transcribes_real_speech_and_merging_keeps_it(whisper, real_clips):
    model, processor = whisper
    feats = features(processor, real_clips)
    refs = [c.text for c in real_clips]
    ids, base = _transcribe(model, processor, feats)
    assert wer(refs, base) <= 0.2, base  # the converter is right (research note: 0.12)
    with tm.patched(model, tm.ToMe(r=0)):
        assert torch.equal(_transcribe(model, processor, feats)[0], ids)  # budget 0: bit-identical
    with tm.patched(model, make_method(AudioBenchConfig(), "tome", 375, 4)):
        _, merged = _transcribe(model, processor, feats)
        assert tm.state(model).counts.tolist() == [375] * len(real_clips)
    assert wer(refs, merged) <= wer(refs, base) + 0.05, merged
    with tm.patched(model, make_method(AudioBenchConfig(), "random", 94, 4)):
        _, pruned = _transcribe(model, processor, feats)
    assert wer(refs, pruned) > wer(refs, merged) + 0.2  # the measurement can tell them apart


@pytest.mark.real
def test_dtome_calibrated_on_speech_gives_silence_fewer_tokens(whisper, real_clips):
    model, processor = whisper
    held_out = speech_clips(14, sources=("librivox", "cards", "espeak"))[10:]
    dtome = tm.get_method("dtome")
    tm.calibrate(
        model,
        dtome,
        features(processor, held_out).split(2),
        r=budget("dtome", 375, 4),
        forward=lambda m, x: m.get_encoder()(x),
    )
    feats = features(processor, real_clips)
    with tm.patched(model, dtome), torch.no_grad():
        model.get_encoder()(feats)
        counts = tm.state(model).counts
        alone = [int(tm.state(model).counts) for _ in [model.get_encoder()(feats[:1])]]
    assert len(set(counts.tolist())) > 3, counts  # dynamic: every clip its own count
    assert alone[0] == int(counts[0])  # a clip's count does not depend on its batch
    secs = torch.tensor([c.seconds for c in real_clips])
    rank = lambda t: t.argsort().argsort().float()  # noqa: E731
    rho = float(torch.corrcoef(torch.stack([rank(secs), rank(counts.float())]))[0, 1])
    assert rho > 0.5, (secs.tolist(), counts.tolist())  # longer speech keeps more tokens


@pytest.mark.real
def test_the_bench_cli_writes_its_report_and_report_remakes_it(tmp_path):
    argv = ["bench", "--model", "whisper-tiny-en", "--n", "3", "--methods", "tome,truncate",
            "--budgets", "375", "--timing-runs", "1", "--param", "bench.timing_batch=2",
            "--param", "bench.timing_warmup=0", "--param", "bench.calibration=1",
            "--out", str(tmp_path), "--name", "w"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "tokenmerge.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads((tmp_path / "w.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in saved["rows"]}
    assert set(rows) == {("unreduced", 1500), ("tome", 375), ("truncate", 375)}
    assert rows["tome", 375]["tokens"] == 375 and rows["tome", 375]["encoder_ratio"] > 0
    assert 0 <= rows["truncate", 375]["agreement"] <= 1
    assert (tmp_path / "w.png").stat().st_size > 0
    md = (tmp_path / "w.md").read_text()
    assert "| tome | 375 |" in md
    (tmp_path / "w.md").unlink()
    again = subprocess.run(
        [sys.executable, "-m", "tokenmerge.cli.main", "report", str(tmp_path / "w.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "w.md").read_text() == md
