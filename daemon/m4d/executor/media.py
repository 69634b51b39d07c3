"""The media side of the runtime: the image's speech and vision components, loaded into
torch, and the one operation the engine asks of them: recognise a batch of inputs.

Every method runs on the executor thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m4d.engine.media import Recognised
from m4d.engine.requests import TextBox
from m4d.errors import InvalidArgument

log = logging.getLogger(__name__)

# Component kinds this module loads, and the module name tasks use for each.
MEDIA_KINDS = ("whisper", "easyocr")


@dataclass(frozen=True)
class MediaComponent:
    name: str
    kind: str
    parameters: int


class MediaRuntime:
    """The speech recogniser and the OCR pipeline of one image, by component name."""

    def __init__(self, root: Path, compute_dtype: torch.dtype) -> None:
        self.root = root
        self.compute_dtype = compute_dtype
        self.devices: dict[str, torch.device] = {}  # component name -> where it runs
        self.speech: dict[str, Any] = {}  # component name -> WhisperTranscriber
        self.ocr: dict[str, Any] = {}  # component name -> OcrPipeline
        self.sample_rates: dict[str, int] = {}

    def load(self, name: str, spec: dict[str, Any], device: torch.device) -> MediaComponent:
        kind = spec["kind"]
        self.devices[name] = device
        if kind == "whisper":
            from m4d.model.whisper import WhisperConfig, WhisperTranscriber, load_whisper

            cfg = WhisperConfig.from_dict(spec["config"])
            model = load_whisper(self.root / spec["weights"], cfg, compute_dtype=self.compute_dtype,
                                 device=str(device))
            self.speech[name] = WhisperTranscriber(model, self.root / spec["tokenizer"], cfg)
            self.sample_rates[name] = int(spec["config"].get("sample_rate", 16_000))
            return MediaComponent(name, kind, sum(p.numel() for p in model.parameters()))
        if kind == "easyocr":
            from m4d.model.ocr import OcrPipeline

            pipeline = OcrPipeline.from_files(self.root / spec["detector"],
                                              self.root / spec["recognizer"], spec["config"],
                                              compute_dtype=self.compute_dtype)
            self.ocr[name] = pipeline
            params = sum(p.numel() for m in (pipeline.detector, pipeline.recognizer)
                         for p in m.parameters())
            return MediaComponent(name, kind, params)
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
            pipeline = self.ocr[module]
            out = []
            for image in inputs:
                boxes = pipeline.read(image)
                out.append(Recognised(
                    pipeline.read_text(boxes),
                    boxes=tuple(TextBox(b.text, float(b.confidence),
                                        tuple((int(x), int(y)) for x, y in b.box))
                                for b in boxes)))
            return out
        raise InvalidArgument(f"this image has no speech or vision component named {module!r}")
