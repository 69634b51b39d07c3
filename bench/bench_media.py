"""Benchmark (outside the serving pipeline): speech and OCR through m4d next to the reference
runtimes, in one run and one table.

For issue "M4's multimodal paths on real weights". Starts a real `m4d` on the image and
compares:

* transcription of the espeak-ng sentences of tests/speech.py (Whisper tiny.en):
  - m4d, one call at a time: real-time factor = call wall time / audio seconds (lower is
    faster), and the same over all clips in flight at once (aggregate);
  - CTranslate2 (the runtime the weights were published for) on the same model.bin, float32
    and int8, `intra_threads` = the daemon's threads, greedy, no timestamps, one clip at a
    time and all in one batch. Its features come from our log-mel (the same for both sides),
    timed as part of its work.
  Word error rate of each side, so speed is compared at equal quality.
* OCR of the Pillow-rendered images of tests/rendering.py (EasyOCR's CRAFT + english_g2):
  - m4d: images/s one call at a time and with every image in flight;
  - EasyOCR's own pipeline (`easyocr.Reader.readtext`), same thread count.
  Character accuracy of each.

Each side runs `--repeats` times after a warm-up, alternating (A, B, A, B, ...); the table
shows medians and the ratios m4d / reference.

    python bench/bench_media.py --image build/images/default [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

from benchkit.cpu import OtherCpuMeter
from benchkit.daemon import Daemon
from benchkit.imports import tests_module
from benchkit.options import add_image, add_json
from benchkit.report import emit, progress

# the test suite's inputs and scores: espeak-ng clips and WER, rendered text and accuracy
speech = tests_module("speech")
rendering = tests_module("rendering")

log = progress("bench_media")


# ---- speech ---------------------------------------------------------------------------


def audio_seconds(wavs: list[bytes]) -> float:
    import io
    import wave

    total = 0.0
    for data in wavs:
        with wave.open(io.BytesIO(data)) as w:
            total += w.getnframes() / w.getframerate()
    return total


def through_m4d(call: Any, items: list[Any], concurrent: bool) -> tuple[float, list[str]]:
    """Seconds for `call(item).text` over all items (one at a time or all in flight), texts."""
    started = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(items)) as pool:
            texts = [r.text for r in pool.map(call, items)]
    else:
        texts = [call(item).text for item in items]
    return time.perf_counter() - started, texts


class Ct2Whisper:
    """The CTranslate2 runtime on the package's model.bin, fed our log-mel features."""

    def __init__(self, model_dir: Path, compute_type: str, threads: int) -> None:
        import ctranslate2
        from tokenizers import Tokenizer

        self.ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(str(model_dir), device="cpu",
                                                compute_type=compute_type, intra_threads=threads)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.prompt = [self.tokenizer.token_to_id("<|startoftranscript|>"),
                       self.tokenizer.token_to_id("<|notimestamps|>")]

    def transcribe(self, wavs: list[bytes], batch: bool) -> tuple[float, list[str]]:
        import numpy as np
        import torch
        from m4d.prepare.audio import decode_wav, log_mel, resample

        started = time.perf_counter()
        groups = [wavs] if batch else [[w] for w in wavs]
        texts: list[str] = []
        for group in groups:
            mels = []
            for data in group:
                audio, rate = decode_wav(data, max_seconds=30.0)
                mels.append(log_mel(resample(audio, rate, 16_000)))
            features = self.ct2.StorageView.from_array(
                np.ascontiguousarray(torch.stack(mels).numpy().astype(np.float32)))
            results = self.model.generate(features, [self.prompt] * len(group), beam_size=1,
                                          max_length=224, suppress_blank=True)
            texts += [self.tokenizer.decode(r.sequences_ids[0]).strip() for r in results]
        return time.perf_counter() - started, texts


# ---- OCR ------------------------------------------------------------------------------


def ocr_images() -> list[tuple[bytes, str]]:
    return [(rendering.render_lines(lines, font, size), "\n".join(lines))
            for font, size in rendering.FONTS for lines in rendering.TEST_LINES]


class EasyOcr:
    def __init__(self, models: Path, threads: int) -> None:
        import torch

        # EasyOCR imports torchvision; see tests/torchvision_compat.py
        tests_module("torchvision_compat").declare_missing_ops()
        import easyocr

        torch.set_num_threads(threads)
        self.reader = easyocr.Reader(["en"], gpu=False, model_storage_directory=str(models),
                                     download_enabled=False, verbose=False)

    def read(self, images: list[bytes]) -> tuple[float, list[str]]:
        import io

        import numpy as np
        from PIL import Image

        started = time.perf_counter()
        texts = []
        for data in images:
            array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            results = self.reader.readtext(array)
            texts.append(_join_lines(results))
        return time.perf_counter() - started, texts


def _join_lines(results: list[Any]) -> str:
    """EasyOCR's (box, text, confidence) list as lines: boxes whose vertical centres are
    close form a line, read left to right."""
    items = sorted(((sum(p[1] for p in box) / 4, box[0][0], text) for box, text, _ in results))
    lines: list[list[tuple[float, str]]] = []
    last_y = None
    for y, x, text in items:
        if last_y is None or abs(y - last_y) > 12:
            lines.append([])
        lines[-1].append((x, text))
        last_y = y
    return "\n".join(" ".join(t for _, t in sorted(line)) for line in lines)


# ---- the run --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from m4client import Client
    from m4d.builder.build import (
        OCR_FOLDER,
        OCR_PACKAGE,
        SPEECH_FOLDER,
        SPEECH_PACKAGE,
        package_dir,
    )

    sentences = list(speech.SENTENCES)
    log(f"synthesising {len(sentences)} sentences with espeak-ng")
    wavs = [speech.synthesize(s) for s in sentences]
    seconds = audio_seconds(wavs)
    images = ocr_images()
    pngs, refs = [b for b, _ in images], [r for _, r in images]

    results: dict[str, Any] = {"threads": args.threads, "audio_seconds": round(seconds, 2),
                               "clips": len(wavs), "images": len(pngs), "speech": {}, "ocr": {}}
    speech_times: dict[str, list[float]] = {}
    speech_texts: dict[str, list[str]] = {}
    ocr_times: dict[str, list[float]] = {}
    ocr_texts: dict[str, list[str]] = {}

    def record(store: dict[str, list[float]], texts: dict[str, list[str]], name: str,
               outcome: tuple[float, list[str]]) -> None:
        store.setdefault(name, []).append(outcome[0])
        texts[name] = outcome[1]

    log("loading the references")
    ct2 = {ct: Ct2Whisper(package_dir(SPEECH_PACKAGE) / SPEECH_FOLDER, ct, args.threads)
           for ct in ("float32", "int8")}
    easy = EasyOcr(package_dir(OCR_PACKAGE) / OCR_FOLDER, args.threads)

    with Daemon(args.image, args.threads, "warn") as daemon, \
            Client(daemon.address, timeout=600) as client:
        log(f"m4d ready in {daemon.wait_serving(client):.1f} s")
        meter = OtherCpuMeter([daemon.proc.pid, os.getpid()])  # the references run here
        # warm-up: one of each
        from m4client import Audio, Image

        def transcribe(wav: bytes) -> Any:
            return client.transcribe(Audio(wav))

        def read(png: bytes) -> Any:
            return client.read_text(Image(png))

        through_m4d(transcribe, wavs[:1], False)
        through_m4d(read, pngs[:1], False)
        for c in ct2.values():
            c.transcribe(wavs[:1], False)
        easy.read(pngs[:1])
        for rep in range(args.repeats):
            log(f"repeat {rep + 1}/{args.repeats}")
            record(speech_times, speech_texts, "m4d, one at a time", through_m4d(transcribe, wavs, False))
            for ct, c in ct2.items():
                record(speech_times, speech_texts, f"CTranslate2 {ct}, one at a time",
                       c.transcribe(wavs, False))
            record(speech_times, speech_texts, "m4d, all in flight", through_m4d(transcribe, wavs, True))
            for ct, c in ct2.items():
                record(speech_times, speech_texts, f"CTranslate2 {ct}, one batch",
                       c.transcribe(wavs, True))
            record(ocr_times, ocr_texts, "m4d, one at a time", through_m4d(read, pngs, False))
            record(ocr_times, ocr_texts, "EasyOCR readtext", easy.read(pngs))
            record(ocr_times, ocr_texts, "m4d, all in flight", through_m4d(read, pngs, True))
        results["other_cpu_share"] = round(meter.other_share(), 3)

    base = median(speech_times["CTranslate2 float32, one at a time"])
    for name, times in speech_times.items():
        t = median(times)
        results["speech"][name] = {"rtf": round(t / seconds, 4), "seconds": round(t, 3),
                                   "vs_ct2_fp32_serial": round(base / t, 2),
                                   "wer": round(speech.wer(sentences, speech_texts[name]), 4)}
    base = median(ocr_times["EasyOCR readtext"])
    for name, times in ocr_times.items():
        t = median(times)
        accuracy = rendering.char_accuracy("\n".join(ocr_texts[name]), "\n".join(refs))
        results["ocr"][name] = {"images_per_s": round(len(pngs) / t, 2),
                                "vs_easyocr": round(base / t, 2),
                                "char_accuracy": round(accuracy, 4)}
    return results


def render(results: dict[str, Any]) -> str:
    lines = [f"speech: {results['clips']} clips, {results['audio_seconds']} s of audio; "
             f"threads {results['threads']}; other processes used "
             f"{results.get('other_cpu_share', 0) * 100:.0f}% of the CPUs",
             f"{'transcription':38} {'RTF':>8} {'speed vs CT2 fp32 serial':>26} {'WER':>7}"]
    for name, r in results["speech"].items():
        lines.append(f"{name:38} {r['rtf']:>8.4f} {r['vs_ct2_fp32_serial']:>25.2f}x {r['wer']:>7.3f}")
    lines += ["", f"OCR: {results['images']} rendered images",
              f"{'reader':38} {'images/s':>8} {'speed vs EasyOCR':>26} {'chars':>7}"]
    for name, r in results["ocr"].items():
        lines.append(f"{name:38} {r['images_per_s']:>8.2f} {r['vs_easyocr']:>25.2f}x "
                     f"{r['char_accuracy']:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_image(parser, help="firmware image directory (with the speech and ocr components)")
    parser.add_argument("--repeats", type=int, default=3, help="measured repetitions per side")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of m4d and of each reference")
    add_json(parser)
    args = parser.parse_args(argv)
    emit(run(args), render, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
