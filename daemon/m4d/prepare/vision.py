"""Request-preparation stage, images: decoded Pillow images -> normalised pixel tensors.

What a CLIP-family checkpoint's ``preprocessor_config.json`` (HF ``CLIPImageProcessor``) asks
for: optional padding to a square with the mean colour (LLaVA / MobileVLM "pad" aspect
ratio), bicubic resize of the shortest side, centre crop, rescale to [0, 1], normalise with
the checkpoint's mean/std. Pillow does the resampling on 8-bit RGB, as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from m4d.errors import InvalidArgument

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
             3: Image.Resampling.BICUBIC}
MAX_IMAGE_PIXELS = 64_000_000  # refuse decoded images bigger than this (8k x 8k)


@dataclass
class PreprocessConfig:
    shortest_edge: int = 224
    crop_size: int = 224
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3  # PIL code: 3 = bicubic
    do_center_crop: bool = True
    pad_to_square: bool = False  # LLaVA / MobileVLM image_aspect_ratio "pad"

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(x) for x in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(x) for x in self.image_std)  # type: ignore[assignment]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB)")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample {self.resample} is not one of {sorted(_RESAMPLE)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, pad_to_square: bool = False) -> PreprocessConfig:
        """From a HF ``preprocessor_config.json`` (``size``/``crop_size`` as int or dict)."""
        size, crop = d.get("size", 224), d.get("crop_size", 224)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"size {size} is not supported; only shortest_edge resizing")
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"non-square crop_size {crop} is not supported")
            crop = crop["height"]
        if not d.get("do_resize", True) or not d.get("do_normalize", True) or not d.get("do_rescale", True):
            raise ValueError("preprocessors without resize, rescale or normalisation are not supported")
        if abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise ValueError(f"rescale_factor {d['rescale_factor']} is not supported; only 1/255")
        return cls(shortest_edge=int(size), crop_size=int(crop),
                   image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
                   image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
                   resample=int(d.get("resample", 3)),
                   do_center_crop=bool(d.get("do_center_crop", True)), pad_to_square=pad_to_square)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d


def _expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _one(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    w, h = img.size
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise InvalidArgument(f"image is {w}x{h}; sizes from 1x1 to {MAX_IMAGE_PIXELS} pixels are accepted")
    img = img.convert("RGB")
    if cfg.pad_to_square:
        img = _expand_to_square(img, tuple(int(m * 255) for m in cfg.image_mean))  # type: ignore[arg-type]
        w, h = img.size
    # Resize: the short side becomes shortest_edge, the long side is scaled and truncated.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize(size, resample=_RESAMPLE[cfg.resample])
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    if cfg.do_center_crop:
        c = cfg.crop_size
        ih, iw = arr.shape[:2]
        if ih < c or iw < c:  # pad with zeros around, as the reference does
            canvas = np.zeros((max(ih, c), max(iw, c), 3), dtype=np.uint8)
            top, left = (canvas.shape[0] - ih) // 2, (canvas.shape[1] - iw) // 2
            canvas[top : top + ih, left : left + iw] = arr
            arr, ih, iw = canvas, canvas.shape[0], canvas.shape[1]
        top, left = (ih - c) // 2, (iw - c) // 2
        arr = arr[top : top + c, left : left + c]
    x: np.ndarray = arr.astype(np.float32) * np.float32(1 / 255)
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)  # [3, H, W]


def preprocess(images: Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Pillow images -> float32 pixels [B, 3, crop, crop]."""
    if not images:
        raise InvalidArgument("no images given")
    return torch.from_numpy(np.stack([_one(im, cfg) for im in images]))
