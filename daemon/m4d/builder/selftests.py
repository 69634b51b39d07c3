"""Image build stage: the self-test an image carries, computed with the float32 reference path.

For each component with a check (backbone generation, text-encoder embedding, OCR, speech) the
builder runs a fixed input through the float32 model as built into the staging directory and
records the result; the daemon runs the same inputs in the format it serves before it marks
the image good (``m4d.service.selftest``). Inputs that are files (an image, a WAV clip) are
written under ``self_test/`` in the image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from m4image.fsutil import atomic_write_bytes
from m4image.manifest import SelfTest

from m4d.builder.errors import BuildError
from m4d.builder.importers.common import Progress

log = logging.getLogger(__name__)

OCR_CHECK_TEXT = "M4 reads 42 words"
CHAT_CHECK = "What is the capital of France?"
CHAT_MAX_TOKENS = 24
# The daemon compares greedy ids exactly in the weight format it serves (int4/int8/bf16), so the
# prompts are ones whose greedy continuation is the same in all of them (checked: "The three
# primary colors are" diverges in bf16 after 5 tokens; this one matches for 16 in every format).
GENERATE_CHECK = "The capital of Japan is"
GENERATE_MAX_TOKENS = 12
EMBED_QUERY = "How do I bake bread at home?"
EMBED_CANDIDATES = [
    "The stock market fell sharply on Monday after the announcement.",
    "Mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven.",
    "My cat likes to sleep in the sun all afternoon.",
]


def generation_checks(image: Path, backbone: dict[str, Any], progress: Progress) -> list[SelfTest]:
    import torch

    from m4d.model.llama import LlamaConfig, greedy_generate, load_llama
    from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer

    cfg = LlamaConfig.from_dict(backbone["config"])
    progress("self-test: load fp32 reference", 0, 1)
    model = load_llama(image / backbone["weights"], cfg, weight_format="float32", compute_dtype=torch.float32)
    progress("self-test: load fp32 reference", 1, 1)
    tok = TextTokenizer.from_file(image / backbone["tokenizer"], bos_id=cfg.bos_id, eos_id=cfg.eos_id)
    cases: list[tuple[str, Any, str, int]] = []
    if backbone.get("chat_template"):
        template = ChatTemplate(backbone["chat_template"], bos_token=tok.bos_token,
                                eos_token=tok.eos_token)
        messages = [{"role": "user", "content": CHAT_CHECK}]
        cases.append(("chat", messages, template.render(messages, add_generation_prompt=True),
                      CHAT_MAX_TOKENS))
    cases.append(("complete", GENERATE_CHECK, GENERATE_CHECK, GENERATE_MAX_TOKENS))
    model.setup_caches(n_slots=1, max_seq=256, dtype=torch.float32)
    checks = []
    for i, (task, value, prompt, max_tokens) in enumerate(cases, 1):
        ids = greedy_generate(model, tok.encode(prompt), max_tokens, cfg.eos_id)
        text = tok.decode(ids)
        log.info("self-test %s: %r", task, text)
        checks.append(SelfTest(task=task, input=value, max_tokens=max_tokens,
                               expected_text=text, expected_token_ids=ids))
        progress("self-test: generate", i, len(cases))
    return checks


def embed_check(image: Path, encoder: dict[str, Any], progress: Progress) -> SelfTest:
    import torch
    from tokenizers import Tokenizer

    from m4d.model.bert import BertConfig, embed_with_counts, load_bert

    model = load_bert(image / encoder["weights"], BertConfig.from_dict(encoder["config"]),
                      compute_dtype=torch.float32)
    tok = Tokenizer.from_file(str(image / encoder["tokenizer"]))
    vecs = embed_with_counts(model, tok, [EMBED_QUERY, *EMBED_CANDIDATES],
                             encoder["max_seq_len"], normalize=encoder["normalize"]).vectors
    sims = (vecs[1:] @ vecs[0]).tolist()
    best = max(range(len(sims)), key=sims.__getitem__)
    margin = sorted(sims)[-1] - sorted(sims)[-2]
    if margin < 0.05:
        raise BuildError(f"embed self-test is ambiguous (margin {margin:.3f}); choose clearer sentences")
    progress("self-test: embed", 1, 1)
    return SelfTest(task="embed", input={"query": EMBED_QUERY, "candidates": list(EMBED_CANDIDATES)}, expected_best=best,
                    expected_scores=[round(s, 4) for s in sims])


def ocr_check(image: Path, ocr: dict[str, Any], progress: Progress) -> SelfTest:
    """Render a line of text, read it with the float32 pipeline, record the result."""
    import io

    import torch
    from PIL import Image, ImageDraw, ImageFont

    from m4d.model.ocr import OcrPipeline, read_text

    font = ImageFont.load_default(size=40)
    canvas = Image.new("RGB", (560, 90), "white")
    ImageDraw.Draw(canvas).text((20, 20), OCR_CHECK_TEXT, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    (image / "self_test").mkdir(exist_ok=True)
    atomic_write_bytes(image / "self_test" / "ocr.png", buf.getvalue())
    pipeline = OcrPipeline.from_files(image / ocr["detector"], image / ocr["recognizer"],
                                      ocr["config"], compute_dtype=torch.float32)
    text = read_text(pipeline.read(canvas.copy()))
    if text.split() != OCR_CHECK_TEXT.split():
        raise BuildError(f"OCR self-test read {text!r}, not {OCR_CHECK_TEXT!r}")
    progress("self-test: ocr", 1, 1)
    return SelfTest(task="ocr", input={"image": "self_test/ocr.png"}, expected_text=text)


def speech_check(image: Path, speech: dict[str, Any], progress: Progress) -> SelfTest:
    """A fixed synthetic clip (two tones, no speech tool needed) transcribed by the float32
    model: the daemon must get the same text in the dtype it serves."""
    import math
    import struct
    import wave

    import torch

    from m4d.model.whisper import WhisperConfig, WhisperTranscriber, load_whisper
    from m4d.prepare.audio import decode_wav

    rate, seconds = 16_000, 2.0
    samples = [0.3 * math.sin(2 * math.pi * (220 if i < rate else 440) * i / rate)
               for i in range(int(rate * seconds))]
    (image / "self_test").mkdir(exist_ok=True)
    import io
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(s * 32767)) for s in samples))
    atomic_write_bytes(image / "self_test" / "speech.wav", buf.getvalue())
    cfg = WhisperConfig.from_dict(speech["config"])
    model = load_whisper(image / speech["weights"], cfg, compute_dtype=torch.float32)
    transcriber = WhisperTranscriber(model, image / speech["tokenizer"], cfg)
    audio, _ = decode_wav(buf.getvalue(), max_seconds=30.0)
    text = transcriber.transcribe([audio])[0].text.strip()
    progress("self-test: speech", 1, 1)
    return SelfTest(task="transcribe", input={"audio": "self_test/speech.wav"}, expected_text=text)
