"""Sensor windows (IMU and the like) as model input, and a small classifier head over them.

A window is a dense tensor [T, C]: T time steps of C channels (e.g. accelerometer and
gyroscope x/y/z, C = 6). The head summarises each channel over time (mean, standard
deviation, min, max: length-independent features, so any T works) and runs an MLP to
label scores, the classic on-device activity-recognition recipe.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from m4d.errors import InvalidArgument

# dtype names a Tensor input may carry, and what they read as.
DTYPES = {"float32": np.float32, "float64": np.float64, "int16": np.int16, "int32": np.int32}
MAX_ELEMENTS = 1 << 20


def tensor_from_bytes(name: str, dtype: str, shape: list[int], data: bytes,
                      spec_dtype: str, spec_shape: list[int]) -> torch.Tensor:
    """A Tensor input checked against its IOSpec (dtype, shape with -1 for a free dimension)
    and turned into float32; every mismatch is InvalidArgument naming what was expected."""
    if dtype not in DTYPES:
        raise InvalidArgument(f"input {name!r} has dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if spec_dtype and dtype != spec_dtype:
        raise InvalidArgument(f"input {name!r} must be {spec_dtype}, not {dtype}")
    if not shape or any(d <= 0 for d in shape):
        raise InvalidArgument(f"input {name!r} has shape {shape}; every dimension must be > 0")
    if spec_shape and (len(shape) != len(spec_shape)
                       or any(s != -1 and s != d for s, d in zip(spec_shape, shape, strict=True))):
        raise InvalidArgument(f"input {name!r} has shape {shape}; the task takes {spec_shape} "
                              "(-1 = any length)")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InvalidArgument(f"input {name!r} has {count} elements; the limit is {MAX_ELEMENTS}")
    item = np.dtype(DTYPES[dtype]).itemsize
    if len(data) != count * item:
        raise InvalidArgument(f"input {name!r}: shape {shape} of {dtype} needs {count * item} "
                              f"bytes, got {len(data)}")
    array = np.frombuffer(data, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).reshape(shape)
    out = torch.from_numpy(array.astype(np.float32))
    if not torch.isfinite(out).all():
        raise InvalidArgument(f"input {name!r} has NaN or infinite values")
    return out


@dataclass(frozen=True)
class SensorHeadConfig:
    channels: int
    labels: list[str]
    hidden: list[int] = field(default_factory=list)  # hidden layer widths (ReLU between)
    min_steps: int = 2  # shortest window (the standard deviation needs two steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensorHeadConfig:
        cfg = cls(channels=int(d["channels"]), labels=[str(x) for x in d["labels"]],
                  hidden=[int(x) for x in d.get("hidden", [])],
                  min_steps=int(d.get("min_steps", 2)))
        if cfg.channels <= 0 or len(cfg.labels) < 2 or len(set(cfg.labels)) != len(cfg.labels):
            raise ValueError("a sensor head needs channels > 0 and at least two distinct labels")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def features(self) -> int:
        return 4 * self.channels


def window_features(window: torch.Tensor) -> torch.Tensor:
    """window [T, C] -> [4C]: per-channel mean, standard deviation, min and max."""
    return torch.cat([window.mean(0), window.std(0, unbiased=False), window.amin(0), window.amax(0)])


class SensorHead(nn.Module):
    def __init__(self, cfg: SensorHeadConfig) -> None:
        super().__init__()
        self.config = cfg
        widths = [cfg.features, *cfg.hidden, len(cfg.labels)]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    @torch.inference_mode()
    def forward(self, windows: list[torch.Tensor]) -> torch.Tensor:
        """windows: each [T_i, C] -> label probabilities [B, L]."""
        for w in windows:
            if w.ndim != 2 or w.shape[1] != self.config.channels or w.shape[0] < self.config.min_steps:
                raise InvalidArgument(f"a window must be [T >= {self.config.min_steps}, "
                                      f"{self.config.channels}], got {list(w.shape)}")
        x = torch.stack([window_features(w) for w in windows])  # [B, 4C]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return torch.softmax(x, dim=-1)


def load_sensor_head(weights: str | Path, cfg: SensorHeadConfig) -> SensorHead:
    model = SensorHead(cfg)
    expected = model.state_dict()
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        names = set(f.keys())
        if names != set(expected):
            raise ValueError(f"{weights}: tensors {sorted(names ^ set(expected))} do not match "
                             "the head's layers")
        state = {n: f.get_tensor(n).float() for n in names}
    for n, t in state.items():
        if t.shape != expected[n].shape:
            raise ValueError(f"{weights}: {n} is {list(t.shape)}, expected {list(expected[n].shape)}")
    model.load_state_dict(state)
    return model.eval()
