"""Executor stage, OCR text detector: CRAFT (Baek et al. 2019) as EasyOCR ships it.

A VGG16-BN backbone whose stage outputs (taken after batch norm, before the ReLU, as the
reference slices them) feed a U-net of four upsampling blocks; a small conv head turns the
last 32-channel map into two half-resolution score maps: region (character centres) and
affinity (links between neighbouring characters). The detection post-processing lives in
``m4d.model.ocr``. Weights are our canonical names (``canonical_names``), written by the image
builder (``m4d.builder.importers.easyocr``) and loaded by mmap from safetensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4d.model.weights import load_into


@dataclass
class CraftConfig:
    """CRAFT's shape; the defaults are EasyOCR's ``craft_mlt_25k``."""

    in_channels: int = 3
    num_classes: int = 2  # region score, affinity score
    batch_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CraftConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConvBN(nn.Module):
    """Conv2d followed by BatchNorm2d (eval statistics); the ReLU is applied by the caller."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding)
        self.bn = nn.BatchNorm2d(cout, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.bn(self.conv(x))
        return out


# VGG16-BN convolutions that CRAFT uses (conv5_3 is not used), grouped by where a stage ends.
_VGG = {
    "conv1_1": (3, 64), "conv1_2": (64, 64),
    "conv2_1": (64, 128), "conv2_2": (128, 128),
    "conv3_1": (128, 256), "conv3_2": (256, 256), "conv3_3": (256, 256),
    "conv4_1": (256, 512), "conv4_2": (512, 512), "conv4_3": (512, 512),
    "conv5_1": (512, 512), "conv5_2": (512, 512),
}


class VggBackbone(nn.Module):
    """Returns (fc7, s5, s4, s3, s2): strides 16, 16, 8, 4, 2; channels 1024, 512, 512, 256, 128.

    The skips are the outputs of conv2_2, conv3_2, conv4_2 (after ReLU) and conv5_2 (before
    ReLU): where EasyOCR's torchvision slices are cut. The reference stores the first three
    before ReLU, but the next slice's in-place ReLU rectifies them; conv5_2's next layer is a
    max-pool, so it stays unrectified, and fc6/fc7 have no ReLU.
    """

    def __init__(self, config: CraftConfig) -> None:
        super().__init__()
        eps = config.batch_norm_eps
        first = {"conv1_1": config.in_channels}
        self.convs = nn.ModuleDict(
            {n: ConvBN(first.get(n, cin), cout, 3, 1, eps) for n, (cin, cout) in _VGG.items()}
        )
        self.fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6)
        self.fc7 = nn.Conv2d(1024, 1024, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # x: [B, 3, H, W] (H, W multiples of 32)
        c = self.convs
        relu, pool = F.relu, F.max_pool2d
        h = relu(c["conv1_1"](x))
        h = pool(relu(c["conv1_2"](h)), 2)
        h = relu(c["conv2_1"](h))
        s2 = relu(c["conv2_2"](h))  # [B, 128, H/2, W/2]
        h = relu(c["conv3_1"](pool(s2, 2)))
        s3 = relu(c["conv3_2"](h))  # [B, 256, H/4, W/4]
        h = relu(c["conv3_3"](s3))
        h = relu(c["conv4_1"](pool(h, 2)))
        s4 = relu(c["conv4_2"](h))  # [B, 512, H/8, W/8]
        h = relu(c["conv4_3"](s4))
        h = relu(c["conv5_1"](pool(h, 2)))
        s5 = c["conv5_2"](h)  # [B, 512, H/16, W/16], no ReLU
        h = F.max_pool2d(s5, kernel_size=3, stride=1, padding=1)
        fc7: Tensor = self.fc7(self.fc6(h))  # [B, 1024, H/16, W/16]; no ReLU between, as trained
        return fc7, s5, s4, s3, s2


class UpBlock(nn.Module):
    """1x1 conv-BN-ReLU to ``mid`` then 3x3 conv-BN-ReLU to ``cout`` (the U-net 'double conv')."""

    def __init__(self, cin: int, mid: int, cout: int, eps: float) -> None:
        super().__init__()
        self.reduce = ConvBN(cin, mid, 1, 0, eps)
        self.conv = ConvBN(mid, cout, 3, 1, eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(F.relu(self.reduce(x))))


class Craft(nn.Module):
    """Image [B, 3, H, W] (normalised RGB) -> scores [B, H/2, W/2, 2] (region, affinity)."""

    def __init__(self, config: CraftConfig) -> None:
        super().__init__()
        self.config = config
        eps = config.batch_norm_eps
        self.backbone = VggBackbone(config)
        self.up1 = UpBlock(1024 + 512, 512, 256, eps)
        self.up2 = UpBlock(256 + 512, 256, 128, eps)
        self.up3 = UpBlock(128 + 256, 128, 64, eps)
        self.up4 = UpBlock(64 + 128, 64, 32, eps)
        self.head = nn.ModuleList([
            nn.Conv2d(32, 32, 3, padding=1),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.Conv2d(32, 16, 3, padding=1),
            nn.Conv2d(16, 16, 1),
            nn.Conv2d(16, config.num_classes, 1),
        ])

    def forward(self, x: Tensor) -> Tensor:
        fc7, s5, s4, s3, s2 = self.backbone(x)
        y = self.up1(torch.cat([fc7, s5], dim=1))  # [B, 256, H/16, W/16]
        for up, skip in ((self.up2, s4), (self.up3, s3), (self.up4, s2)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        # y: [B, 32, H/2, W/2]
        for i, conv in enumerate(self.head):
            y = conv(y)
            if i < len(self.head) - 1:
                y = F.relu(y)
        out: Tensor = y.permute(0, 2, 3, 1)  # [B, H/2, W/2, 2]
        return out


# ---------------------------------------------------------------------------------------------
# Weights: EasyOCR names -> canonical names

# torchvision vgg16_bn ``features`` index of each conv (its BatchNorm is index + 1).
_VGG_INDEX = {
    "conv1_1": 0, "conv1_2": 3, "conv2_1": 7, "conv2_2": 10, "conv3_1": 14, "conv3_2": 17,
    "conv3_3": 20, "conv4_1": 24, "conv4_2": 27, "conv4_3": 30, "conv5_1": 34, "conv5_2": 37,
}


def _vgg_slice(index: int) -> int:
    """EasyOCR's slice (1-4) holding torchvision ``features[index]``."""
    for n, end in enumerate((12, 19, 29, 39), start=1):
        if index < end:
            return n
    raise ValueError(f"vgg16_bn feature {index} is not in CRAFT's slices")


def reference_name_map() -> dict[str, str]:
    """canonical name -> EasyOCR ``CRAFT`` state-dict name (without a DataParallel prefix)."""
    m: dict[str, str] = {}
    bn_params = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for name, idx in _VGG_INDEX.items():
        sl = _vgg_slice(idx)
        for p in ("weight", "bias"):
            m[f"backbone.convs.{name}.conv.{p}"] = f"basenet.slice{sl}.{idx}.{p}"
        for p in bn_params:
            m[f"backbone.convs.{name}.bn.{p}"] = f"basenet.slice{sl}.{idx + 1}.{p}"
    for p in ("weight", "bias"):
        m[f"backbone.fc6.{p}"] = f"basenet.slice5.1.{p}"
        m[f"backbone.fc7.{p}"] = f"basenet.slice5.2.{p}"
    for i in range(1, 5):
        for ours, ref in (("reduce", 0), ("conv", 3)):
            for p in ("weight", "bias"):
                m[f"up{i}.{ours}.conv.{p}"] = f"upconv{i}.conv.{ref}.{p}"
            for p in bn_params:
                m[f"up{i}.{ours}.bn.{p}"] = f"upconv{i}.conv.{ref + 1}.{p}"
    for i, ref in enumerate((0, 2, 4, 6, 8)):
        for p in ("weight", "bias"):
            m[f"head.{i}.{p}"] = f"conv_cls.{ref}.{p}"
    return m


def canonical_names(config: CraftConfig | None = None) -> list[str]:
    """Tensor names a firmware image stores for the detector (our module's state dict)."""
    with torch.device("meta"):
        return list(Craft(config or CraftConfig()).state_dict().keys())


def load_craft(
    weights_file: str | Path,
    config: CraftConfig | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Craft:
    """Build on meta, mmap the safetensors file and assign its tensors; returns an eval model."""
    with torch.device("meta"):
        model = Craft(config or CraftConfig())

    def nhwc(name: str, t: Tensor) -> Tensor:  # oneDNN runs 10-20% faster (640x224, 1 thread)
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    return load_into(model, weights_file, what="detector", compute_dtype=compute_dtype,
                     device=device, prepare=nhwc)


# ---------------------------------------------------------------------------------------------
# Decoding the score maps into word boxes (numpy only; the daemon does not depend on OpenCV)


@dataclass
class Component:
    """One 4-connected component of a binary map: its bounding box and pixel count."""

    label: int
    x: int
    y: int
    w: int
    h: int
    area: int


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, list[Component]]:
    """4-connected components of a boolean map [H, W], labelled 1..N in raster order of each
    component's first pixel (0 = background). Run-length based union-find."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)  # [H, W+1]: +1 where a run starts, -1 one past where it ends
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # same row-major order, so runs pair up
    n = len(rows)
    labels = np.zeros((h, w), dtype=np.int32)
    if n == 0:
        return labels, []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(h + 1))  # index of the first run of each row
    sl, el = starts.tolist(), ends.tolist()
    for r in range(1, h):
        a, a_end = int(row_first[r - 1]), int(row_first[r])
        b, b_end = a_end, int(row_first[r + 1])
        while a < a_end and b < b_end:  # two runs touch (4-connectivity) iff their columns overlap
            if sl[a] < el[b] and sl[b] < el[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)  # root = earliest run in raster order
            if el[a] < el[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    uniq, inverse = np.unique(roots, return_inverse=True)  # sorted roots = raster order
    run_label = inverse.astype(np.int32) + 1
    lengths = ends - starts
    pix_rows = np.repeat(rows, lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels[pix_rows, np.repeat(starts, lengths) + offsets] = np.repeat(run_label, lengths)

    k = len(uniq)
    x0 = np.full(k, w, dtype=np.int64)
    x1 = np.zeros(k, dtype=np.int64)
    y0 = np.full(k, h, dtype=np.int64)
    y1 = np.zeros(k, dtype=np.int64)
    area = np.zeros(k, dtype=np.int64)
    idx = run_label - 1
    np.minimum.at(x0, idx, starts)
    np.maximum.at(x1, idx, ends)
    np.minimum.at(y0, idx, rows)
    np.maximum.at(y1, idx, rows + 1)
    np.add.at(area, idx, lengths)
    comps = [
        Component(i + 1, int(x0[i]), int(y0[i]), int(x1[i] - x0[i]), int(y1[i] - y0[i]), int(area[i]))
        for i in range(k)
    ]
    return labels, comps


def dilate_rect(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation by a k x k square (anchor at k // 2, as OpenCV), pixels outside ignored."""
    if k <= 1:
        return mask.copy()
    a = k // 2
    out = mask
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (a, k - 1 - a)  # dst[i] = max(src[i - a .. i + k - 1 - a])
        p = np.pad(out, pad)
        acc = np.zeros_like(out)
        for s in range(k):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(s, s + n)
            acc |= p[tuple(sl)]
        out = acc
    return out


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone chain hull of integer points [N, 2] -> [M, 2] float64, counter-clockwise."""
    pts = sorted({(int(x), int(y)) for x, y in points})
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64)

    def cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[int, int]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def min_area_rect(points: np.ndarray) -> np.ndarray:
    """Corners [4, 2] (float32) of the smallest-area rectangle around integer points (x, y),
    clockwise on screen (y down), starting from the corner with the smallest x + y."""
    # Only each row's leftmost and rightmost points can be on the hull.
    ys = points[:, 1]
    order = np.lexsort((points[:, 0], ys))
    p = points[order]
    first = np.r_[True, p[1:, 1] != p[:-1, 1]]
    last = np.r_[p[1:, 1] != p[:-1, 1], True]
    hull = _convex_hull(np.concatenate([p[first], p[last]]))
    if len(hull) == 1:
        corners = np.repeat(hull, 4, axis=0)
    else:
        edges = np.roll(hull, -1, axis=0) - hull  # [M, 2]
        norms = np.linalg.norm(edges, axis=1)
        keep = norms > 0
        u = edges[keep] / norms[keep, None]  # edge directions [E, 2]
        v = np.stack([-u[:, 1], u[:, 0]], axis=1)  # normals
        pu, pv = hull @ u.T, hull @ v.T  # [M, E] projections
        areas = (pu.max(0) - pu.min(0)) * (pv.max(0) - pv.min(0))
        e = int(np.argmin(areas))
        a0, a1 = pu[:, e].min(), pu[:, e].max()
        b0, b1 = pv[:, e].min(), pv[:, e].max()
        corners = np.array([a * u[e] + b * v[e] for a, b in ((a0, b0), (a1, b0), (a1, b1), (a0, b1))])
    center = corners.mean(axis=0)
    ang = np.arctan2(corners[:, 1] - center[1], corners[:, 0] - center[0])
    corners = corners[np.argsort(ang, kind="stable")]  # increasing angle = clockwise on screen
    start = int(corners.sum(axis=1).argmin())
    return np.roll(corners, -start, axis=0).astype(np.float32)


def decode_boxes(
    text_map: np.ndarray,
    link_map: np.ndarray,
    *,
    text_threshold: float,
    link_threshold: float,
    low_text: float,
    min_area: int = 10,
) -> list[np.ndarray]:
    """Word boxes [4, 2] float32 (map coordinates, clockwise from top-left) from CRAFT's maps.

    As EasyOCR/CRAFT: binarise region > ``low_text`` or affinity > ``link_threshold``; keep
    4-connected components of at least ``min_area`` pixels whose peak region score reaches
    ``text_threshold``; drop link-only pixels, dilate by a square scaled to the component's
    thickness, and fit a minimum-area rectangle (axis-aligned when nearly square).
    """
    h, w = text_map.shape
    text_bin = text_map > low_text
    link_bin = link_map > link_threshold
    labels, comps = connected_components(text_bin | link_bin)
    link_only = link_bin & ~text_bin
    boxes: list[np.ndarray] = []
    for c in comps:
        if c.area < min_area:
            continue
        win = (slice(c.y, c.y + c.h), slice(c.x, c.x + c.w))
        own = labels[win] == c.label
        if text_map[win][own].max() < text_threshold:
            continue
        niter = int(math.sqrt(c.area * min(c.w, c.h) / (c.w * c.h)) * 2)
        sx, ex = max(c.x - niter, 0), min(c.x + c.w + niter + 1, w)
        sy, ey = max(c.y - niter, 0), min(c.y + c.h + niter + 1, h)
        seg = labels[sy:ey, sx:ex] == c.label
        seg &= ~link_only[sy:ey, sx:ex]
        seg = dilate_rect(seg, 1 + niter)
        ys, xs = np.nonzero(seg)
        pts = np.stack([xs + sx, ys + sy], axis=1)
        box = min_area_rect(pts)
        bw, bh = np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[1] - box[2])
        if abs(1 - max(bw, bh) / (min(bw, bh) + 1e-5)) <= 0.1:  # nearly square: axis-aligned
            x0, x1, y0, y1 = pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max()
            box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)
        boxes.append(box)
    return boxes
