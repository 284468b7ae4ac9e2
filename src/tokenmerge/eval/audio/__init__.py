"""Speech data and scoring for the Whisper benchmark.

- `speech_clips`: real LibriVox and card-name utterances (Debian ``pocketsphinx-testdata``)
  plus espeak-ng readings of Austen and Moby-Dick sentences, 16 kHz mono float32;
- `wer`, `word_errors`, `per_clip_wer`: word error rate after the small `normalize`.
"""

from .data import PACKAGE, SAMPLE_RATE, SOURCES, Clip, describe, install, speech_clips
from .wer import TITLES, normalize, per_clip_wer, wer, word_errors

__all__ = [
    "PACKAGE",
    "SAMPLE_RATE",
    "SOURCES",
    "TITLES",
    "Clip",
    "describe",
    "install",
    "normalize",
    "per_clip_wer",
    "speech_clips",
    "wer",
    "word_errors",
]
