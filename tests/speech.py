"""Test helper: synthetic English speech (espeak-ng) and word error rate.

``synthesize(text)`` returns WAV bytes (22050 Hz mono 16-bit, espeak-ng's output);
``wer(refs, hyps)`` is the corpus word error rate: word-level edit distance summed over pairs,
divided by the number of reference words, after ``normalize`` (lower case, numbers spelled
out, punctuation dropped). ``SENTENCES`` are varied test sentences.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the finance team by Friday.",
    "It is going to rain tomorrow afternoon, so bring an umbrella.",
    "We will meet at the train station at seven o'clock.",
    "My sister bought three apples and two oranges at the market.",
    "Can you turn off the lights in the kitchen, please?",
    "The meeting has been moved to next Tuesday morning.",
    "Water boils at one hundred degrees Celsius.",
    "I would like a cup of coffee with milk and no sugar.",
    "The children played football in the park until it got dark.",
    "Our flight to London leaves in forty five minutes.",
    "Remember to call your mother on her birthday.",
]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999999 as English words without 'and' or hyphens ("forty five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    if n < 1_000_000:
        return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))
    return " ".join(_ONES[int(d)] for d in str(n))


def normalize(text: str) -> list[str]:
    """Lower-case words with numbers spelled out, hyphens split, other punctuation dropped."""
    text = text.lower().replace("%", " percent").replace("&", " and ")
    text = re.sub(r"(\d),(\d)", r"\1\2", text)  # 1,000 -> 1000
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)
    text = re.sub(r"[-‐–—/]", " ", text)
    text = re.sub(r"[^a-z' ]", " ", text).replace("'", "")
    return text.split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between word sequences (substitution, insertion, deletion = 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate over paired reference/hypothesis texts."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r = normalize(ref)
        errors += edit_distance(r, normalize(hyp))
        words += len(r)
    if words == 0:
        raise ValueError("references contain no words")
    return errors / words


def synthesize(text: str, *, speed: int = 130, voice: str = "en-us", gap: int = 4) -> bytes:
    """Speak ``text`` with espeak-ng: WAV bytes (22050 Hz, mono, 16-bit PCM).

    Defaults (130 words/min, 40 ms between words) keep espeak's robotic voice intelligible to
    small Whisper checkpoints (tiny.en: ~6% WER here vs ~25% at espeak's 175 wpm, no gap).
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed; the speech tests need it (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-g", str(gap), "-w", str(out), text], check=True,
                       capture_output=True, timeout=60)
        return out.read_bytes()
