"""English speech clips with reference transcripts (16 kHz mono float32 in [-1, 1]).

==============  ==========================================================================
source          what
==============  ==========================================================================
``librivox``    5 LibriVox readings of *Sense and Sensibility* (real speech, 3–7 s), Debian
                ``pocketsphinx-testdata`` ``librivox/`` with its ``transcription`` file
``cards``       5 short utterances of playing-card names (real speech, 1–4 s), same package,
                ``cards/`` with ``cards.transcription``
``espeak``      sentences from Jane Austen and Moby-Dick (`tokenmerge.eval.corpora`) read by
                ``espeak-ng`` in varied voices, speeds and pitches (synthetic, 2–15 s)
==============  ==========================================================================

``pocketsphinx-testdata`` is unpacked without installing (``apt-get download`` + ``dpkg -x``,
see `install`) and every file read is checked against a pinned sha256. Its raw PCM files
(``goforward.raw``, ``numbers.raw``, ``something.raw``, ``tidigits/dhd.2934z.raw``) are left
out: the package holds no transcript for them, only grammars and keyword lists.

The espeak clips need the ``espeak-ng`` program (``apt-get install espeak-ng``). Each
synthesis is cached as a 16 kHz 16-bit WAV under ``<cache_dir()>/speech/``, named by a hash of
the espeak-ng version, the sentence and the voice settings, so a second call only reads files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import corpora
from ..text_data import _debian_file, debian_root
from ..zoo import AssetError, MissingPackageError, cache_dir

__all__ = [
    "PACKAGE",
    "SAMPLE_RATE",
    "SOURCES",
    "Clip",
    "describe",
    "install",
    "speech_clips",
]

SAMPLE_RATE = 16_000
SOURCES: tuple[str, ...] = ("librivox", "cards", "espeak")


@dataclass(frozen=True)
class Clip:
    """One utterance: `audio` is float32 mono at `SAMPLE_RATE` in [-1, 1] (read-only), `text`
    the reference transcript, `source` one of `SOURCES`."""

    name: str
    source: str
    text: str
    audio: np.ndarray = field(repr=False, compare=False)

    @property
    def seconds(self) -> float:
        """The clip's duration in seconds."""
        return len(self.audio) / SAMPLE_RATE


def _pcm16(data: bytes, where: str) -> tuple[int, np.ndarray]:
    """(sample rate, int16 samples) of a mono 16-bit PCM WAV. A streamed header (espeak-ng
    ``--stdout`` cannot seek back, so its sizes are placeholders) is read to the end."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AssetError(f"{where}: not a WAV file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if tag == b"fmt ":
            fmt = struct.unpack_from("<HHIIHH", data, pos + 8)
        elif tag == b"data":
            if fmt is None or (fmt[0], fmt[1], fmt[5]) != (1, 1, 16):
                raise AssetError(f"{where}: expected 16-bit mono PCM, got format {fmt}")
            body = data[pos + 8 : pos + 8 + size]
            return fmt[2], np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2")
        pos += 8 + size + (size & 1)
    raise AssetError(f"{where}: no data chunk")


def _float(samples: np.ndarray) -> np.ndarray:
    audio = (samples.astype(np.float32) / 32768.0).astype(np.float32)
    audio.flags.writeable = False  # clips are shared through caches
    return audio


# --------------------------------------------------------------------------------------------
# Real speech: Debian pocketsphinx-testdata
# --------------------------------------------------------------------------------------------

PACKAGE = "pocketsphinx-testdata=0.8+5prealpha+1-15"
_DIR = "usr/share/pocketsphinx/test/data"
_LIBRIVOX = "librivox/sense_and_sensibility_01_austen_64kb-"
_TRANSCRIPTS = {"librivox": "librivox/transcription", "cards": "cards/cards.transcription"}
_SHA256 = {
    "librivox/transcription": "4cc29e04a6dcd29242893b3ee20470e50b6ace45f4387bb619e5218145c66f99",
    f"{_LIBRIVOX}0870.wav": "b0557cf95c974d930577e58e46b7f068c432a6e3afcc286563d88922b2a5315c",
    f"{_LIBRIVOX}0880.wav": "fbec491ef00ee734a67f0ee318e98c51c157b479e1629ff4f4426861ecac0414",
    f"{_LIBRIVOX}0890.wav": "5793ffbdee55fb8bfd284943a6866864c832d9d4accf2661cabd39915c84ee10",
    f"{_LIBRIVOX}0920.wav": "40882414ef4cc51f3ff7a63bad0c8c87e7f595ffeb8209fbf756c8ebc5c28a59",
    f"{_LIBRIVOX}0930.wav": "954adbf0b56ac8a148cbe77b39ca18d76b5f2a1e1f405565bd786ce3e68a68b7",
    "cards/cards.transcription": "5f11ecf64b8c45e4596d128293c66e695844854ad03cc79ffabde72dea1eba05",
    "cards/001.wav": "899951e768666f27c8f8b1d4090b96fe7909cae9cec01bec0a5d5d1b8a8d566e",
    "cards/002.wav": "a3f9eae6fdb69a1231989e39a14d62388a6f52fb59666c76d95005318fadafec",
    "cards/003.wav": "00d283e46bc257ae479e4aa86593cadb541656eba1d19fc8abeece37f6a5a18b",
    "cards/004.wav": "4c44a8177f5b128b99f078cdeb918119933155574231f1833e8840d1af09c521",
    "cards/005.wav": "090f18f5f76cf8b2b43cd9e6b07823f4685a4742d9a36cd98b174a6586c18cf9",
}
# "<s> ten of clubs  </s> (001)": sentence markers, words, then the utterance id
_LINE = re.compile(r"<s>(.*)</s>\s*\(([^()\s]+)\)")


def install(root: Path | None = None) -> Path:
    """Download ``pocketsphinx-testdata`` (pinned version) and unpack it under `root`
    (default `debian_root`), without installing; returns the unpack root."""
    return corpora.install((PACKAGE,), root if root is not None else debian_root())


def _file(relpath: str) -> Path:
    return _debian_file(PACKAGE.split("=")[0], f"{_DIR}/{relpath}", _SHA256[relpath])


def _parse_transcription(text: str, where: str) -> list[tuple[str, str]]:
    """(utterance id, transcript) per line of a Sphinx transcription file."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line.strip())
        if m is None:
            raise AssetError(f"{where}:{i}: not '<s> words </s> (id)': {line!r}")
        out.append((m[2], " ".join(m[1].split())))
    return out


@functools.lru_cache(maxsize=2)
def _real_clips(source: str) -> tuple[Clip, ...]:
    folder = _TRANSCRIPTS[source].split("/")[0]
    clips = []
    listing = _file(_TRANSCRIPTS[source])
    for uid, text in _parse_transcription(listing.read_text(encoding="ascii"), str(listing)):
        path = _file(f"{folder}/{uid}.wav")
        rate, samples = _pcm16(path.read_bytes(), str(path))
        if rate != SAMPLE_RATE or not text:
            raise AssetError(f"{path}: expected {SAMPLE_RATE} Hz and a transcript, got {rate} Hz")
        clips.append(Clip(f"{source}-{uid}", source, text, _float(samples)))
    if len(clips) != 5:
        raise AssetError(f"{_TRANSCRIPTS[source]}: expected 5 utterances, got {len(clips)}")
    return tuple(clips)


# --------------------------------------------------------------------------------------------
# Synthetic speech: espeak-ng reading sentences of the text corpora
# --------------------------------------------------------------------------------------------

# Voices chosen by Whisper tiny.en WER on two sets of 10 sentences (speed 155): en-us 0.12,
# en (British) 0.18, en-gb-x-rp 0.17; en-us-nyc, en-gb-x-gbclan 0.27, en-gb-scotland 0.44,
# en-029 0.52 and en-gb-x-gbcwmd 0.60 are left out, as are the variants f1 f3 f4 f5 (0.35-0.46
# on en-us).
# "en", not "en-gb": espeak-ng 1.51 silently ignores a "+variant" after "en-gb".
_VOICES = ("en-us", "en", "en-gb-x-rp")
_VARIANTS = ("", "+m1", "+m3", "+m6", "+f2")  # "" is the voice's own
_SPEED = (140, 170)  # words per minute, both ends included; 190 raised the WER by a third
_PITCH = (35, 65)  # espeak's 0-99 scale; 50 is the default
_SECONDS = (2.0, 15.0)  # a synthesised clip outside this range is skipped
_WORDS = (8, 30)  # about 2-12 s at these speeds, the range of the LibriVox clips and more
_BOOKS = ("austen", "mobydick")
# one sentence of plain prose: no digits, underscores (italics), brackets or non-ASCII
_PLAIN = re.compile(r"""["']?[A-Z][A-Za-z ,;:'"!?.-]*[.!?]["']?""")
# split after . ! ? (and a closing quote) but not after the titles Mr. Mrs. Dr. St.
_SPLIT = re.compile(
    r"""(?:(?<=[.!?])|(?<=[.!?]["']))(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)"""
    r"""\s+(?=["']?[A-Z])"""
)


@functools.lru_cache(maxsize=1)
def _sentences() -> tuple[tuple[str, str], ...]:
    """(book, sentence) for every plain prose sentence of `_WORDS` words in the corpora."""
    found: dict[str, str] = {}
    for book in _BOOKS:
        for doc in corpora.documents(book):
            for para in doc.split("\n\n"):
                for s in _SPLIT.split(para):
                    if (
                        _PLAIN.fullmatch(s)
                        and not re.search("[A-Z]{2}", s)  # headings, "EXTRACTS", initials
                        and s.count('"') % 2 == 0  # no quote left open by the split
                        and _WORDS[0] <= len(s.split()) <= _WORDS[1]
                    ):
                        found.setdefault(s, book)
    return tuple((book, s) for s, book in found.items())


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MissingPackageError(
            "espeak-ng is not installed; the 'espeak' speech clips need it. Install it with: "
            "apt-get install espeak-ng (or pass sources=('librivox', 'cards'))"
        )
    return exe


@functools.lru_cache(maxsize=1)
def _espeak_version() -> str:
    out = subprocess.run([_espeak(), "--version"], capture_output=True, text=True, check=True)
    m = re.search(r"text-to-speech:\s*(\S+)", out.stdout)
    if m is None:
        raise AssetError(f"cannot read the espeak-ng version from {out.stdout.strip()!r}")
    return m[1]


def _synthesise(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """int16 samples at `SAMPLE_RATE` of espeak-ng reading `text`, from the cache if there."""
    settings = {"espeak-ng": _espeak_version(), "text": text, "voice": voice}
    settings |= {"speed": speed, "pitch": pitch, "rate": SAMPLE_RATE}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / "speech" / f"{key}.wav"
    if not path.is_file():
        cmd = [_espeak(), "--stdout", "--stdin", "-v", voice, "-s", str(speed), "-p", str(pitch)]
        done = subprocess.run(cmd, input=text.encode(), capture_output=True, check=False)
        if done.returncode != 0 or not done.stdout:
            err = done.stderr.decode(errors="replace").strip()
            raise AssetError(f"{' '.join(cmd)} failed (exit {done.returncode}): {err}")
        rate, raw = _pcm16(done.stdout, "espeak-ng output")
        from scipy.signal import resample_poly  # scipy only for the synthetic clips

        g = math.gcd(SAMPLE_RATE, rate)
        pcm = resample_poly(raw.astype(np.float64), SAMPLE_RATE // g, rate // g)
        pcm = np.clip(np.round(pcm), -32768, 32767).astype("<i2")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # atomic: no torn files
        with os.fdopen(fd, "wb") as f, wave.open(f, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(pcm.tobytes())
        os.replace(tmp, path)
    rate, samples = _pcm16(path.read_bytes(), str(path))  # the cache is the one code path
    return samples


def _espeak_clips(n: int, seed: int) -> list[Clip]:
    """The first `n` clips of a seeded walk over the sentences: a sentence whose synthesis
    falls outside `_SECONDS` is skipped, so ``n`` clips are a prefix of ``n + 1`` clips."""
    pool = _sentences()
    order = np.random.default_rng(seed).permutation(len(pool))
    draw = np.random.default_rng([seed, 1])
    clips: list[Clip] = []
    for i in order:
        if len(clips) == n:
            break
        book, text = pool[i]
        voice = _VOICES[draw.integers(len(_VOICES))] + _VARIANTS[draw.integers(len(_VARIANTS))]
        speed = int(draw.integers(_SPEED[0], _SPEED[1] + 1))
        pitch = int(draw.integers(_PITCH[0], _PITCH[1] + 1))
        audio = _float(_synthesise(text, voice, speed, pitch))
        if _SECONDS[0] <= len(audio) / SAMPLE_RATE <= _SECONDS[1]:
            clips.append(Clip(f"espeak-{len(clips):03d}-{book}", "espeak", text, audio))
    if len(clips) < n:
        raise ValueError(f"only {len(clips)} espeak clips can be made, {n} were asked for")
    return clips


def speech_clips(n: int = 110, seed: int = 0, sources: Sequence[str] = SOURCES) -> list[Clip]:
    """`n` speech clips: the real ones of `sources` first (librivox, then cards, 5 each, in
    file order), then seeded espeak clips up to `n`.

    Args:
        n: the number of clips. If it is smaller than the number of real clips, the first `n`
            real clips are returned; a larger `n` needs ``"espeak"`` in `sources`.
        seed: chooses the espeak sentences and voices (the real clips do not depend on it).
        sources: any of ``"librivox"``, ``"cards"``, ``"espeak"``; the result keeps that
            canonical order whatever order is given.

    Raises:
        MissingPackageError: ``pocketsphinx-testdata`` is not unpacked, or ``espeak-ng`` is
            not installed; the message names the command that fixes it.
        TypeError, ValueError: bad arguments; the message names the accepted values.
    """
    if isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
        raise TypeError(f"sources must be a sequence of names from {SOURCES}, got {sources!r}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources or len(set(sources)) != len(sources):
        raise ValueError(
            f"sources must be distinct names from {SOURCES} (at least one), got {tuple(sources)}"
        )
    for arg, value in (("n", n), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{arg} must be an int, got {value!r}")
    if n < 1 or seed < 0:
        raise ValueError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    real = [c for s in _TRANSCRIPTS if s in sources for c in _real_clips(s)]
    if n <= len(real):
        return real[:n]
    if "espeak" not in sources:
        raise ValueError(
            f"n={n} but sources {tuple(sources)} hold only {len(real)} real clips; "
            "add 'espeak' to sources or lower n"
        )
    return real + _espeak_clips(n - len(real), int(seed))


def describe(clips: Sequence[Clip]) -> dict:
    """Counts and durations for a report: ``{"clips", "per_source": {source: count},
    "seconds": {"total", "min", "median", "max"}}`` (seconds rounded to 0.01)."""
    if not clips:
        raise ValueError("describe() needs at least one clip")
    secs = np.array([c.seconds for c in clips])
    per_source = {s: sum(c.source == s for c in clips) for s in SOURCES}
    stats = {"total": secs.sum(), "min": secs.min(), "median": np.median(secs), "max": secs.max()}
    return {
        "clips": len(clips),
        "per_source": {s: k for s, k in per_source.items() if k},
        "seconds": {k: round(float(v), 2) for k, v in stats.items()},
    }
