"""Executor stage, OCR pipeline: image -> CRAFT word boxes -> text lines -> CRNN text, in reading order.

Re-implements EasyOCR's ``Reader.readtext`` defaults (English, greedy decoding) with our own
modules (``m4d.model.craft``, ``m4d.model.crnn``) and without OpenCV:

1. detection input: scale so the longer side is ``mag_ratio`` x itself, capped at
   ``canvas_size``; pad with zeros to multiples of 32; normalise with ImageNet mean/std;
2. CRAFT maps -> word boxes (``craft.decode_boxes``), scaled back to image coordinates;
3. boxes -> lines: near-horizontal boxes are grouped into lines by centre height and merged
   with their neighbours when the gap is small, with a margin; tilted boxes stay separate;
4. each box is cropped from the grey image (perspective-warped when tilted), resized to the
   recogniser's height, right-padded by repeating its last column to a multiple of 64 px,
   recognised, and CTC-decoded greedily; a low-confidence crop is retried with more contrast.

Crops that pad to the same width are recognised together in one batch (identical results to
one at a time); ``recognize_crops(..., common_width=True)`` pads all crops to one width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from m4d.errors import InvalidArgument
from m4d.model.craft import Craft, CraftConfig, decode_boxes, load_craft
from m4d.model.crnn import Crnn, CrnnConfig, ctc_greedy, load_crnn


@dataclass
class OcrConfig:
    """Everything the pipeline needs besides weights; defaults are EasyOCR's ``readtext``."""

    charset: str = ""
    image_height: int = 64
    ignore_chars: str = ""
    feature_channels: int = 256
    hidden_size: int = 256
    canvas_size: int = 2560
    mag_ratio: float = 1.0
    text_threshold: float = 0.7
    low_text: float = 0.4
    link_threshold: float = 0.4
    min_size: int = 20
    slope_ths: float = 0.1
    ycenter_ths: float = 0.5
    height_ths: float = 0.5
    width_ths: float = 0.5
    add_margin: float = 0.1
    contrast_ths: float = 0.1
    adjust_contrast: float = 0.5
    detector_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    detector_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_batch: int = 32
    ignore: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.charset:
            raise ValueError("OcrConfig needs the recogniser's charset")
        self.detector_mean = tuple(self.detector_mean)  # type: ignore[assignment]
        self.detector_std = tuple(self.detector_std)  # type: ignore[assignment]
        self.ignore = sorted(self.charset.index(c) + 1 for c in set(self.ignore_chars) if c in self.charset)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OcrConfig:
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ignore")
        d["detector_mean"], d["detector_std"] = list(self.detector_mean), list(self.detector_std)
        return d

    def crnn(self) -> CrnnConfig:
        return CrnnConfig(charset=self.charset, image_height=self.image_height,
                          feature_channels=self.feature_channels, hidden_size=self.hidden_size)


@dataclass
class TextBox:
    """One recognised piece of text: a word or a run of words on one line."""

    text: str
    confidence: float
    box: list[tuple[int, int]]  # 4 corners, clockwise from top-left, image pixels


# ---------------------------------------------------------------------------------------------
# Pixel helpers (OpenCV-free equivalents of what EasyOCR calls)


_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: fixed-point weights in 1/2048


def _linear_taps(src: int, dst: int, clip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and fixed-point weights (w0, w1) of each output pixel, computed
    in float32 as OpenCV does. ``clip``: a tap left of the first or right of the last source
    pixel takes that pixel whole (OpenCV's horizontal pass); otherwise indices are clamped."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0.astype(np.float32)).astype(np.float32)
    if clip:
        outside = (i0 < 0) | (i0 >= src - 1)
        frac = np.where(outside, np.float32(0.0), frac).astype(np.float32)
        i0 = np.where(i0 < 0, 0, np.minimum(i0, src - 1))
    one = np.float32(1 << _COEF_BITS)
    w1 = np.rint(frac * one).astype(np.int64)
    w0 = np.rint((np.float32(1.0) - frac) * one).astype(np.int64)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def resize_bilinear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> [height, width(, C)]: OpenCV's INTER_LINEAR, bit for bit
    (half-pixel centres, no antialiasing, 11-bit fixed-point weights and its rounding)."""
    if img.shape[1] == width and img.shape[0] == height:
        return img.copy()
    h, w = img.shape[:2]
    x0, x1, ax0, ax1 = _linear_taps(w, width, clip=True)
    y0, y1, by0, by1 = _linear_taps(h, height, clip=False)
    src = img.astype(np.int64)
    if img.ndim == 3:
        ax0, ax1 = ax0[:, None], ax1[:, None]
    rows = src[:, x0] * ax0 + src[:, x1] * ax1  # [H, width(, C)], scaled by 2048
    shape = (-1, 1, 1) if img.ndim == 3 else (-1, 1)
    b0, b1 = by0.reshape(shape), by1.reshape(shape)
    out = (((b0 * (rows[y0] >> 4)) >> 16) + ((b1 * (rows[y1] >> 4)) >> 16) + 2) >> 2
    result: np.ndarray = np.clip(out, 0, 255).astype(np.uint8)
    return result


def warp_quad(img: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Grey uint8 image, quad [4, 2] (TL, TR, BR, BL) -> the quad rectified to its own size,
    bilinear, zero outside the image (EasyOCR's four_point_transform)."""
    tl, tr, br, bl = quad.astype(np.float64)
    width = max(int(np.linalg.norm(br - bl)), int(np.linalg.norm(tr - tl)))
    height = max(int(np.linalg.norm(tr - br)), int(np.linalg.norm(tl - bl)))
    if width <= 0 or height <= 0:
        return np.zeros((0, 0), dtype=np.uint8)
    dst = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    # Homography dst -> src: solve the 8 unknowns from the 4 correspondences.
    a, b = [], []
    for (u, v), (x, y) in zip(dst, quad.astype(np.float64), strict=True):
        a.append([u, v, 1, 0, 0, 0, -u * x, -v * x])
        a.append([0, 0, 0, u, v, 1, -u * y, -v * y])
        b += [x, y]
    try:
        h = np.append(np.linalg.solve(np.array(a), np.array(b)), 1.0).reshape(3, 3)
    except np.linalg.LinAlgError:
        return np.zeros((0, 0), dtype=np.uint8)
    uu, vv = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    den = h[2, 0] * uu + h[2, 1] * vv + h[2, 2]
    sx = (h[0, 0] * uu + h[0, 1] * vv + h[0, 2]) / den
    sy = (h[1, 0] * uu + h[1, 1] * vv + h[1, 2]) / den
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    src = img.astype(np.float64)
    ih, iw = img.shape
    out = np.zeros((height, width), dtype=np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < iw) & (yi >= 0) & (yi < ih)
            out += np.where(ok, src[yi.clip(0, ih - 1), xi.clip(0, iw - 1)], 0.0) * wx * wy
    result: np.ndarray = np.rint(out).clip(0, 255).astype(np.uint8)
    return result


def adjust_contrast(img: np.ndarray, target: float) -> np.ndarray:
    """Stretch a low-contrast grey crop (EasyOCR's adjust_contrast_grey)."""
    high, low = np.percentile(img, 90), np.percentile(img, 10)
    if (high - low) / max(10.0, high + low) >= target:
        return img
    ratio = 200.0 / max(10.0, high - low)
    out = (img.astype(np.int64) - low + 25) * ratio
    result: np.ndarray = np.clip(out, 0, 255).astype(np.uint8)
    return result


# ---------------------------------------------------------------------------------------------
# Boxes -> lines


def group_boxes(quads: Sequence[np.ndarray], c: OcrConfig) -> tuple[list[list[int]], list[np.ndarray]]:
    """Word quads (int) -> (horizontal line boxes [x_min, x_max, y_min, y_max] in reading
    order, tilted quads with a margin). EasyOCR's group_text_box."""
    horizontal: list[list[float]] = []
    free: list[np.ndarray] = []
    for q in quads:
        p = [int(v) for v in np.asarray(q).reshape(-1)]
        slope_up = (p[3] - p[1]) / max(10, p[2] - p[0])
        slope_down = (p[5] - p[7]) / max(10, p[4] - p[6])
        if max(abs(slope_up), abs(slope_down)) < c.slope_ths:
            xs, ys = p[0::2], p[1::2]
            horizontal.append([min(xs), max(xs), min(ys), max(ys), 0.5 * (min(ys) + max(ys)), max(ys) - min(ys)])
        else:
            height = math.hypot(p[6] - p[0], p[7] - p[1])
            width = math.hypot(p[2] - p[0], p[3] - p[1])
            m = int(1.44 * c.add_margin * min(width, height))
            t13 = abs(math.atan((p[1] - p[5]) / max(10, p[0] - p[4])))
            t24 = abs(math.atan((p[3] - p[7]) / max(10, p[2] - p[6])))
            free.append(np.array([
                [p[0] - math.cos(t13) * m, p[1] - math.sin(t13) * m],
                [p[2] + math.cos(t24) * m, p[3] - math.sin(t24) * m],
                [p[4] + math.cos(t13) * m, p[5] + math.sin(t13) * m],
                [p[6] - math.cos(t24) * m, p[7] + math.sin(t24) * m],
            ], dtype=np.float32))
    horizontal.sort(key=lambda b: b[4])
    lines: list[list[list[float]]] = []
    for b in horizontal:
        if lines:
            line = lines[-1]
            if abs(np.mean([x[4] for x in line]) - b[4]) < c.ycenter_ths * np.mean([x[5] for x in line]):
                line.append(b)
                continue
        lines.append([b])
    merged: list[list[int]] = []
    for line in lines:
        groups: list[list[list[float]]] = []
        for b in sorted(line, key=lambda x: x[0]) if len(line) > 1 else line:
            if groups:
                g = groups[-1]
                mean_h = np.mean([x[5] for x in g])
                if abs(mean_h - b[5]) < c.height_ths * mean_h and (b[0] - g[-1][1]) < c.width_ths * (b[3] - b[2]):
                    g.append(b)
                    continue
            groups.append([b])
        for g in groups:
            x0, x1 = min(x[0] for x in g), max(x[1] for x in g)
            y0, y1 = min(x[2] for x in g), max(x[3] for x in g)
            m = int(c.add_margin * min(x1 - x0, y1 - y0))
            merged.append([int(x0 - m), int(x1 + m), int(y0 - m), int(y1 + m)])
    return merged, free


def order_boxes(boxes: Sequence[TextBox], ycenter_ths: float = 0.5) -> list[list[TextBox]]:
    """Group boxes into lines (top to bottom), each line left to right."""
    def geom(b: TextBox) -> tuple[float, float, float]:
        ys = [p[1] for p in b.box]
        return 0.5 * (min(ys) + max(ys)), float(max(ys) - min(ys)), float(min(p[0] for p in b.box))

    lines: list[list[tuple[float, float, float, TextBox]]] = []
    for yc, h, x, b in sorted(((*geom(b), b) for b in boxes), key=lambda t: t[0]):
        if lines and abs(np.mean([t[0] for t in lines[-1]]) - yc) < ycenter_ths * max(float(np.mean([t[1] for t in lines[-1]])), 1.0):
            lines[-1].append((yc, h, x, b))
        else:
            lines.append([(yc, h, x, b)])
    return [[t[3] for t in sorted(line, key=lambda t: t[2])] for line in lines]


def read_text(boxes: Sequence[TextBox]) -> str:
    """Plain text: boxes on one line joined with " ", lines with "\\n"."""
    return "\n".join(" ".join(b.text for b in line if b.text) for line in order_boxes(boxes)).strip("\n")


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Crop:
    """One line (or tilted word) cut out of the grey image, ready for the recogniser."""

    box: list[tuple[int, int]]
    pixels: np.ndarray  # grey uint8 [64, w], already at the recogniser's height
    pad_width: int  # right-pad target: ceil(aspect) * 64


class OcrPipeline:
    """CRAFT detector + CRNN recogniser with EasyOCR's pre- and post-processing."""

    def __init__(self, detector: Craft, recognizer: Crnn, config: OcrConfig,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.detector, self.recognizer, self.config = detector, recognizer, config
        self.dtype = compute_dtype

    @classmethod
    def from_files(cls, detector_weights: str | Path, recognizer_weights: str | Path,
                   config: dict[str, Any], compute_dtype: torch.dtype = torch.float32) -> OcrPipeline:
        """Load from a firmware image's component: its two safetensors files and its config."""
        cfg = OcrConfig.from_dict(config)
        det = load_craft(detector_weights, CraftConfig.from_dict(config.get("detector", {})),
                         compute_dtype=compute_dtype)
        rec = load_crnn(recognizer_weights, cfg.crnn(), compute_dtype=compute_dtype)
        return cls(det, rec, cfg, compute_dtype)

    # -- detection -----------------------------------------------------------------------------

    def _detector_input(self, rgb: np.ndarray) -> tuple[torch.Tensor, float]:
        c = self.config
        h, w, _ = rgb.shape
        target = min(c.mag_ratio * max(h, w), c.canvas_size)
        ratio = target / max(h, w)
        th, tw = int(h * ratio), int(w * ratio)
        if th < 1 or tw < 1:
            raise InvalidArgument(f"image {w}x{h} is too thin to read (scaled to {tw}x{th})")
        canvas = np.zeros((th + (-th) % 32, tw + (-tw) % 32, 3), dtype=np.float32)
        canvas[:th, :tw] = resize_bilinear(rgb, tw, th)
        canvas -= np.array(c.detector_mean, dtype=np.float32) * np.float32(255.0)
        canvas /= np.array(c.detector_std, dtype=np.float32) * np.float32(255.0)
        return torch.from_numpy(canvas).permute(2, 0, 1)[None], ratio  # [1, 3, H32, W32]

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        """RGB uint8 [H, W, 3] -> word quads int32 [4, 2] in image pixels."""
        c = self.config
        x, ratio = self._detector_input(rgb)
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        scores = self.detector(x)[0].float().numpy()  # [H/2, W/2, 2]
        quads = decode_boxes(scores[:, :, 0], scores[:, :, 1], text_threshold=c.text_threshold,
                             link_threshold=c.link_threshold, low_text=c.low_text)
        scale = np.float32(2.0 / ratio)  # map pixels -> image pixels (float32, as the reference)
        return [(q * scale).astype(np.int32) for q in quads]

    # -- crops ---------------------------------------------------------------------------------

    def _to_height(self, crop: np.ndarray) -> tuple[np.ndarray, float]:
        """Resize a grey crop to the model height (EasyOCR's compute_ratio_and_resize)."""
        mh = self.config.image_height
        h, w = crop.shape
        if w / h < 1.0:
            ratio = h / w
            return resize_bilinear(crop, mh, int(mh * ratio)), ratio
        ratio = w / h
        return resize_bilinear(crop, int(mh * ratio), mh), ratio

    def crops(self, grey: np.ndarray, quads: Sequence[np.ndarray]) -> list[Crop]:
        """Grey image and word quads -> line crops in reading order (horizontal, then tilted)."""
        c = self.config
        lines, free = group_boxes(quads, c)
        lines = [b for b in lines if max(b[1] - b[0], b[3] - b[2]) > c.min_size]
        free = [q for q in free if max(np.ptp(q[:, 0]), np.ptp(q[:, 1])) > c.min_size]
        ih, iw = grey.shape
        out: list[Crop] = []
        for x0, x1, y0, y1 in lines:
            x0, x1, y0, y1 = max(0, x0), min(x1, iw), max(0, y0), min(y1, ih)
            if x1 <= x0 or y1 <= y0:
                continue
            pix, ratio = self._to_height(grey[y0:y1, x0:x1])
            out.append(Crop([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], pix, math.ceil(max(ratio, 1.0)) * c.image_height))
        for q in free:
            warped = warp_quad(grey, q)
            if warped.size == 0:
                continue
            pix, ratio = self._to_height(warped)
            box = [(round(float(x)), round(float(y))) for x, y in q]
            out.append(Crop(box, pix, math.ceil(max(ratio, 1.0)) * c.image_height))
        return out

    def _tensor(self, pix: np.ndarray, pad_width: int, contrast: bool) -> torch.Tensor:
        """Grey crop -> [1, H, pad_width] in [-1, 1], right-padded with its last column."""
        mh = self.config.image_height
        if contrast:
            pix = adjust_contrast(pix, self.config.adjust_contrast)
        h, w = pix.shape
        new_w = min(math.ceil(mh * (w / h)), pad_width)
        if (new_w, mh) != (w, h):  # only tall crops: EasyOCR squashes them with PIL bicubic
            pix = np.asarray(Image.fromarray(pix, "L").resize((new_w, mh), Image.Resampling.BICUBIC))
        t = torch.from_numpy(pix.astype(np.float32) / 255.0).sub_(0.5).div_(0.5)  # [H, w]
        out = t[:, -1:].expand(mh, pad_width).clone()
        out[:, :new_w] = t
        return out[None]

    # -- recognition ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, crops: Sequence[Crop], contrast: bool, common_width: bool) -> list[tuple[str, float]]:
        c = self.config
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        if common_width:
            buckets = {max((k.pad_width for k in crops), default=0): list(range(len(crops)))}
        else:
            buckets = {}
            for i, k in enumerate(crops):
                buckets.setdefault(k.pad_width, []).append(i)
        for width, idxs in buckets.items():
            for s in range(0, len(idxs), c.max_batch):
                part = idxs[s : s + c.max_batch]
                x = torch.stack([self._tensor(crops[i].pixels, width, contrast) for i in part])
                logits = self.recognizer(x.to(self.dtype))  # [B, T, K]
                for i, r in zip(part, ctc_greedy(logits, c.charset, c.ignore), strict=True):
                    results[i] = r
        return results

    def recognize_crops(self, crops: Sequence[Crop], *, common_width: bool = False) -> list[tuple[str, float]]:
        """Recognise crops in batches; a crop under ``contrast_ths`` confidence is retried with
        stretched contrast and the more confident reading kept."""
        first = self._run(crops, contrast=False, common_width=common_width)
        low = [i for i, (_, conf) in enumerate(first) if conf < self.config.contrast_ths]
        if low:
            second = self._run([crops[i] for i in low], contrast=True, common_width=common_width)
            for i, r in zip(low, second, strict=True):
                if r[1] >= first[i][1]:
                    first[i] = r
        return first

    def read_batch(self, images: Sequence[Image.Image]) -> list[list[TextBox]]:
        """Several images: detection per image, recognition of all their crops together."""
        all_crops: list[Crop] = []
        owners: list[int] = []
        for n, image in enumerate(images):
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
            grey = np.asarray(image.convert("L"), dtype=np.uint8)
            crops = self.crops(grey, self.detect(rgb))
            all_crops += crops
            owners += [n] * len(crops)
        texts = self.recognize_crops(all_crops)
        out: list[list[TextBox]] = [[] for _ in images]
        for n, k, (text, conf) in zip(owners, all_crops, texts, strict=True):
            out[n].append(TextBox(text, conf, k.box))
        return [[b for line in order_boxes(boxes, self.config.ycenter_ths) for b in line] for boxes in out]

    def read(self, image: Image.Image) -> list[TextBox]:
        """One image -> recognised text boxes in reading order (top to bottom, left to right)."""
        return self.read_batch([image])[0]
