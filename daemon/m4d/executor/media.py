"""The media side of the runtime: the image's speech and vision components, loaded into
torch, and the one operation the engine asks of them: recognise a batch of inputs.

Every method runs on the executor thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m4d.errors import InvalidArgument
from m4d.executor.memory import own_mapping
from m4d.executor.shared import model_key, shared_load
from m4d.requests import Recognised, TextBox

log = logging.getLogger(__name__)

# Component kinds this module loads.
MEDIA_KINDS = ("whisper", "easyocr", "clip", "clip_vision", "projector", "sensor_head")


@dataclass(frozen=True)
class MediaComponent:
    name: str
    kind: str
    parameters: int


class MediaRuntime:
    """The speech recogniser and the OCR pipeline of one image, by component name."""

    def __init__(self, root: Path, compute_dtype: torch.dtype,
                 digest_of: Callable[[str], str | None] = lambda relative: None) -> None:
        self.root = root
        self.digest_of = digest_of  # an image file's sha256 (shared loads across images)
        self.compute_dtype = compute_dtype
        self.devices: dict[str, torch.device] = {}  # component name -> where it runs
        self.speech: dict[str, Any] = {}  # component name -> WhisperTranscriber
        self.ocr: dict[str, Any] = {}  # component name -> OcrPipeline
        self.sample_rates: dict[str, int] = {}
        # CLIP (both towers: path-3 heads) and vision towers that feed a projector (path 1)
        self.clips: dict[str, tuple[Any, Any, Any]] = {}  # name -> (Clip, preprocess, tokenizer)
        self.vision: dict[str, tuple[Any, Any, dict[str, Any]]] = {}  # name -> (Clip, preprocess, spec)
        self.projectors: dict[str, tuple[Any, dict[str, Any]]] = {}  # name -> (Projector, spec)
        self.sensors: dict[str, Any] = {}  # name -> SensorHead

    def load(self, name: str, spec: dict[str, Any], device: torch.device) -> MediaComponent:
        kind = spec["kind"]
        self.devices[name] = device
        if kind == "whisper":
            from m4d.model.whisper import WhisperConfig, WhisperTranscriber, load_whisper

            cfg = WhisperConfig.from_dict(spec["config"])
            digest = self.digest_of(spec["weights"])
            model, _ = shared_load(
                model_key(digest, "whisper", self.compute_dtype, device, config=spec["config"]),
                lambda: load_whisper(self.root / spec["weights"], cfg,
                                     compute_dtype=self.compute_dtype, device=str(device)))
            self.speech[name] = WhisperTranscriber(model, self.root / spec["tokenizer"], cfg)
            self.sample_rates[name] = int(spec["config"].get("sample_rate", 16_000))
            return MediaComponent(name, kind, sum(p.numel() for p in model.parameters()))
        if kind == "easyocr":
            from m4d.model.ocr import OcrPipeline

            pipeline = OcrPipeline.from_files(self.root / spec["detector"],
                                              self.root / spec["recognizer"], spec["config"],
                                              compute_dtype=self.compute_dtype)
            self.ocr[name] = pipeline
            own_mapping(pipeline.detector)
            own_mapping(pipeline.recognizer)
            params = sum(p.numel() for m in (pipeline.detector, pipeline.recognizer)
                         for p in m.parameters())
            return MediaComponent(name, kind, params)
        if kind in ("clip", "clip_vision"):
            from m4d.model.clip import ClipConfig, load_clip
            from m4d.prepare.vision import PreprocessConfig

            clip = load_clip(self.root / spec["weights"], ClipConfig.from_dict(spec["config"]),
                             compute_dtype=self.compute_dtype, device=str(device))
            pre = PreprocessConfig.from_dict(spec["config"]["preprocess"])
            if kind == "clip":
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(self.root / spec["tokenizer"]))
                self.clips[name] = (clip, pre, tokenizer)
            else:
                self.vision[name] = (clip, pre, spec["config"])
            return MediaComponent(name, kind, sum(p.numel() for p in clip.parameters()))
        if kind == "projector":
            from m4d.model.projector import ProjectorConfig, load_projector

            projector = load_projector(self.root / spec["weights"],
                                       ProjectorConfig.from_dict(spec["config"]),
                                       compute_dtype=self.compute_dtype, device=str(device))
            self.projectors[name] = (projector, spec)
            return MediaComponent(name, kind, sum(p.numel() for p in projector.parameters()))
        if kind == "sensor_head":
            from m4d.model.sensor import SensorHeadConfig, load_sensor_head

            head = load_sensor_head(self.root / spec["weights"],
                                    SensorHeadConfig.from_dict(spec["config"]))
            self.sensors[name] = head
            return MediaComponent(name, kind, sum(p.numel() for p in head.parameters()))
        raise ValueError(f"component {name!r} has kind {kind!r}, not a media kind")

    def sample_rate(self, module: str) -> int:
        return self.sample_rates.get(module, 16_000)

    @torch.inference_mode()
    def recognise(self, module: str, inputs: list[Any]) -> list[Recognised]:
        """Transcribes audio (float32 tensors at the module's rate) or reads the text of RGB
        images, depending on what ``module`` is."""
        if module in self.speech:
            transcripts = self.speech[module].transcribe(inputs)
            return [Recognised(t.text.strip(), tokens=len(t.token_ids)) for t in transcripts]
        if module in self.ocr:
            from m4d.model.ocr import read_text

            # detection per image; every crop of the batch through the recogniser together
            return [Recognised(read_text(boxes),
                               boxes=tuple(TextBox(b.text, float(b.confidence),
                                                   tuple((int(x), int(y)) for x, y in b.box))
                                           for b in boxes))
                    for boxes in self.ocr[module].read_batch(inputs)]
        if module in self.sensors:
            return [Recognised("", features=p) for p in self.sensors[module](inputs)]
        if module in self.clips:
            from m4d.prepare.vision import preprocess

            clip, pre, _ = self.clips[module]
            device = self.devices[module]
            feats = clip.image_features(preprocess(inputs, pre).to(device, clip.dtype))  # [B, E]
            return [Recognised("", features=f) for f in feats]
        if module in self.vision:
            from m4d.prepare.vision import preprocess

            clip, pre, cfg = self.vision[module]
            projector, _ = self.projector_for(module)
            pixels = preprocess(inputs, pre).to(self.devices[module], clip.dtype)
            hidden = clip.vision_hidden(pixels, cfg.get("vision_feature_layer", -2),
                                        cfg.get("vision_feature_select_strategy", "default"))
            feats = projector(hidden.to(projector.dtype))  # [B, N, D_backbone]
            return [Recognised("", tokens=int(f.shape[0]), features=f) for f in feats]
        raise InvalidArgument(f"this image has no speech or vision component named {module!r}")

    def projector_for(self, vision_module: str) -> tuple[Any, dict[str, Any]]:
        """The projector that turns this vision encoder's features into backbone inputs."""
        if not self.projectors:
            raise InvalidArgument(f"this image has no projector for {vision_module!r}")
        return next(iter(self.projectors.values()))

    @torch.inference_mode()
    def text_features(self, module: str, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings [N, E] (normalised) in the joint space."""
        from m4d.model.clip import tokenize

        clip, _, tokenizer = self.clips[module]
        ids = tokenize(tokenizer, texts, clip.config.text_config).to(self.devices[module])
        return clip.text_features(ids)  # type: ignore[no-any-return]

    def logit_scale(self, module: str) -> float:
        clip, _, _ = self.clips[module]
        return float(clip.logit_scale.float().exp())
