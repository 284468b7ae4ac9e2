"""Tests for the speech clips and WER scoring of the Whisper benchmark (tokenmerge.eval.audio)."""

from __future__ import annotations

import functools
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmerge.eval.audio import (
    SAMPLE_RATE,
    SOURCES,
    Clip,
    data,
    describe,
    normalize,
    per_clip_wer,
    speech_clips,
    wer,
    word_errors,
)
from tokenmerge.eval.zoo import AssetError, ChecksumError, MissingPackageError

# --------------------------------------------------------------------------------------------
# WER against a slow, obviously correct reference
# --------------------------------------------------------------------------------------------


def _levenshtein(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """The textbook recursion: drop the first word of either side, or match/substitute both."""

    @functools.cache
    def d(i: int, j: int) -> int:
        if i == len(a):
            return len(b) - j
        if j == len(b):
            return len(a) - i
        return min(d(i + 1, j) + 1, d(i, j + 1) + 1, d(i + 1, j + 1) + (a[i] != b[j]))

    return d(0, 0)


_words = st.lists(st.sampled_from(["the", "a", "whale", "sea", "ship", "man", "of"]), max_size=9)


@settings(max_examples=300, deadline=None)
@given(_words, _words)
def test_word_errors_match_the_recursive_levenshtein(ref, hyp):
    errors, n = word_errors(" ".join(ref), " ".join(hyp))
    assert (errors, n) == (_levenshtein(tuple(ref), tuple(hyp)), len(ref))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(_words.filter(bool), _words), min_size=1, max_size=5))
def test_corpus_and_per_clip_wer_are_sums_and_ratios(pairs):
    refs, hyps = [" ".join(r) for r, _ in pairs], [" ".join(h) for _, h in pairs]
    errors = [_levenshtein(tuple(r), tuple(h)) for r, h in pairs]
    assert wer(refs, hyps) == pytest.approx(sum(errors) / sum(len(r) for r, _ in pairs))
    expected = [e / len(r) for e, (r, _) in zip(errors, pairs, strict=True)]
    assert per_clip_wer(refs, hyps) == pytest.approx(expected)


def test_wer_examples_and_errors():
    assert word_errors("Mr. Dashwood's house", "mister dashwood's House!") == (0, 3)
    assert word_errors("ten of clubs", "10 of clubs") == (1, 3)  # digits are not normalised
    assert word_errors("a b", "") == (2, 2) and word_errors("", "a b") == (2, 0)
    assert wer(["a b c d"], ["a x c d e f"]) == 0.75  # one substitution, two insertions
    assert wer(["a"], ["b c d"]) == 3.0
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not single strings"):
        wer("a b", "a b")
    with pytest.raises(ValueError, match="no words after normalisation"):
        wer(["", "..."], ["a", "b"])
    with pytest.raises(ValueError, match=r"reference 1 \('--'\)"):
        per_clip_wer(["a", "--"], ["a", "b"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mr. John Dashwood", "mister john dashwood"),
        ("Mrs.Jennings and Dr. Grant", "missus jennings and doctor grant"),
        ("mr mrs dr", "mister missus doctor"),
        ("Mister Mr", "mister mister"),
        ('"It is," said she--cold-hearted!', "it is said she cold hearted"),
        ("I don't know; the Dashwoods' house.", "i don't know the dashwoods house"),
        ("'Tis Elinor\u2019s", "tis elinor's"),
        ("To-morrow, to-day, to-night; day-school", "tomorrow today tonight day school"),
        ("  Ten\tof\n clubs  ", "ten of clubs"),
        ("Number 10, 54%", "number 10 54"),
        ("mrs_smith (aside)", "missus smith aside"),
        ("", ""),
        ("?!...", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected
    assert normalize(expected) == expected  # idempotent


# --------------------------------------------------------------------------------------------
# Clips, parsing and arguments (no data needed)
# --------------------------------------------------------------------------------------------


def _clip(source: str, seconds: float) -> Clip:
    return Clip(f"{source}-x", source, "a b", np.zeros(int(seconds * SAMPLE_RATE), np.float32))


def test_describe_and_clip():
    clips = [_clip("librivox", 3.0), _clip("cards", 1.0), _clip("espeak", 2.0), _clip("espeak", 8)]
    assert clips[0].seconds == 3.0 and "audio" not in repr(clips[0])
    assert describe(clips) == {
        "clips": 4,
        "per_source": {"librivox": 1, "cards": 1, "espeak": 2},
        "seconds": {"total": 14.0, "min": 1.0, "median": 2.5, "max": 8.0},
    }
    with pytest.raises(ValueError, match="at least one clip"):
        describe([])


def test_transcription_lines_are_parsed_exactly():
    text = "<s> ten of clubs  </s> (001)\n\n<s> and mister john </s> (sense-0870)\n"
    expected = [("001", "ten of clubs"), ("sense-0870", "and mister john")]
    assert data._parse_transcription(text, "t") == expected
    with pytest.raises(AssetError, match=r"t:2: not '<s> words </s> \(id\)'"):
        data._parse_transcription("<s> a </s> (1)\nten of clubs (002)", "t")


def _wav(channels: int, bits: int, rate: int, pcm: bytes, size: int | None = None) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * bits // 8, 2, bits)
    size = len(pcm) if size is None else size
    head = b"RIFF\xff\xff\xff\x7fWAVEfmt " + struct.pack("<I", 16) + fmt
    return head + b"data" + struct.pack("<I", size) + pcm


def test_wav_reader_takes_a_streamed_header_and_refuses_other_formats():
    pcm = np.array([0, 16384, -32768, 32767], "<i2").tobytes()
    rate, samples = data._pcm16(_wav(1, 16, 22050, pcm, size=0x7FFFF000), "x")  # espeak --stdout
    assert rate == 22050 and samples.tolist() == [0, 16384, -32768, 32767]
    assert data._float(samples).tolist() == [0.0, 0.5, -1.0, 32767 / 32768]
    with pytest.raises(AssetError, match="16-bit mono PCM"):
        data._pcm16(_wav(2, 16, 16000, pcm), "x")
    with pytest.raises(AssetError, match="not a WAV"):
        data._pcm16(b"OggS" + pcm, "x")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sources": "librivox"}, TypeError, "sequence of names"),
        ({"sources": ("tts",)}, ValueError, r"from \('librivox', 'cards', 'espeak'\)"),
        ({"sources": ()}, ValueError, "at least one"),
        ({"sources": ("cards", "cards")}, ValueError, "distinct names"),
        ({"n": 0}, ValueError, "n >= 1"),
        ({"n": 2.0}, TypeError, "n must be an int"),
        ({"n": True}, TypeError, "n must be an int"),
        ({"seed": -1}, ValueError, "seed >= 0"),
    ],
)
def test_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        speech_clips(**kwargs)


def test_missing_and_corrupt_pocketsphinx_files_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMERGE_DEBIAN", str(tmp_path))
    data._real_clips.cache_clear()
    try:
        if (Path("/") / data._DIR).exists():
            pytest.skip("pocketsphinx-testdata is installed system-wide")
        with pytest.raises(MissingPackageError, match="apt-get download pocketsphinx-testdata"):
            speech_clips(n=5, sources=("cards",))
        bad = tmp_path / data._DIR / "cards/cards.transcription"
        bad.parent.mkdir(parents=True)
        bad.write_text("<s> ace of spades </s> (001)\n")
        with pytest.raises(ChecksumError, match="sha256 mismatch"):
            speech_clips(n=5, sources=("cards",))
    finally:
        data._real_clips.cache_clear()


def test_missing_espeak_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    data._espeak_version.cache_clear()
    try:
        with pytest.raises(MissingPackageError, match="apt-get install espeak-ng"):
            data._synthesise("Hello there.", "en-us", 160, 50)
    finally:
        data._espeak_version.cache_clear()


# --------------------------------------------------------------------------------------------
# The real data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_clips():
    try:
        return speech_clips(n=10, sources=("librivox", "cards"))
    except MissingPackageError as e:
        pytest.skip(f"pocketsphinx-testdata is not unpacked: {e}")


def test_pocketsphinx_clips(real_clips):
    assert [c.source for c in real_clips] == ["librivox"] * 5 + ["cards"] * 5
    assert real_clips[0].text.startswith("and mister john dashwood had then leisure")
    assert real_clips[5].name == "cards-001" and real_clips[5].text == "ten of clubs"
    assert sum(len(c.text.split()) for c in real_clips) == 92  # as in the research note
    for c in real_clips:
        assert c.audio.dtype == np.float32 and c.audio.ndim == 1 and not c.audio.flags.writeable
        assert 1.0 <= c.seconds <= 7.5 and 0.05 < np.abs(c.audio).max() <= 1.0
        assert c.text == c.text.strip() and "<s>" not in c.text and "(" not in c.text
    assert sum(c.seconds for c in real_clips[:5]) == pytest.approx(24.73)
    assert [c.name for c in speech_clips(n=3)] == [c.name for c in real_clips[:3]]
    with pytest.raises(ValueError, match="add 'espeak' to sources"):
        speech_clips(n=11, sources=("librivox", "cards"))


@pytest.fixture
def espeak_cache(tmp_path, monkeypatch):
    """A fresh speech cache; the Debian corpora stay where they are unpacked."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from tokenmerge.eval import text_data

    monkeypatch.setenv("TOKENMERGE_DEBIAN", str(text_data.debian_root()))
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path))
    try:
        data._sentences()
    except MissingPackageError as e:
        pytest.skip(f"the text corpora are not unpacked: {e}")
    return tmp_path / "speech"


def test_espeak_clips_synthesise_once_then_come_from_the_cache(espeak_cache, monkeypatch):
    clips = speech_clips(n=2, seed=3, sources=("espeak",))
    assert [c.source for c in clips] == ["espeak", "espeak"]
    for c in clips:
        assert c.audio.dtype == np.float32 and 2.0 <= c.seconds <= 15.0
        assert np.abs(c.audio).max() > 0.05 and len(c.text.split()) >= 8
    files = {p: p.stat().st_mtime_ns for p in espeak_cache.glob("*.wav")}
    assert len(files) >= 2 and not list(espeak_cache.glob("*.tmp"))

    real_run = data.subprocess.run

    def no_synthesis(cmd, *args, **kwargs):
        assert "--stdout" not in cmd, "a cached clip was synthesised again"
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(data.subprocess, "run", no_synthesis)
    again = speech_clips(n=2, seed=3, sources=("espeak",))
    assert {p: p.stat().st_mtime_ns for p in espeak_cache.glob("*.wav")} == files
    for a, b in zip(clips, again, strict=True):
        assert (a.name, a.text) == (b.name, b.text) and np.array_equal(a.audio, b.audio)
    monkeypatch.setattr(data.subprocess, "run", real_run)
    longer = speech_clips(n=3, seed=3, sources=("espeak",))  # n clips prefix n + 1 clips
    assert [c.text for c in longer[:2]] == [c.text for c in clips]
    assert speech_clips(n=2, seed=4, sources=("espeak",))[0].text != clips[0].text
    assert SOURCES == ("librivox", "cards", "espeak")
