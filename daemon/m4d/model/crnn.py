"""Executor stage, OCR text recogniser: EasyOCR's "generation 2" CRNN (english_g2).

A grey text-line crop [B, 1, 64, W] goes through a small VGG feature extractor (height 64 -> 3,
width W -> W/4 - 1), is averaged over the remaining height into a sequence [B, T, 256], then
two bidirectional LSTM layers (each followed by a linear projection back to 256) and a linear
classifier give per-step logits over the CTC classes: blank (index 0) + the character set.
Greedy CTC decoding (``ctc_greedy``) and the pipeline live beside it in ``m4d.model.ocr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4d.model.weights import load_into


@dataclass
class CrnnConfig:
    """Shape of the recogniser; defaults are EasyOCR's english_g2 (generation 2)."""

    charset: str = ""  # index i+1 <-> charset[i]; index 0 is the CTC blank
    image_height: int = 64
    input_channels: int = 1
    feature_channels: int = 256
    hidden_size: int = 256
    batch_norm_eps: float = 1e-5
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.charset:
            raise ValueError("CrnnConfig needs the character set (charset) of the checkpoint")
        if len(set(self.charset)) != len(self.charset):
            raise ValueError("CrnnConfig charset has repeated characters")
        if self.image_height != 64:
            raise ValueError(f"image_height {self.image_height} is not supported; the VGG extractor needs 64")
        self.num_classes = len(self.charset) + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrnnConfig:
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("num_classes")
        return d


class FeatureExtractor(nn.Module):
    """[B, 1, 64, W] -> [B, C, 3, W/4 - 1] (C = feature_channels)."""

    def __init__(self, config: CrnnConfig) -> None:
        super().__init__()
        c = config.feature_channels
        c1, c2, c3 = c // 8, c // 4, c // 2
        self.conv1 = nn.Conv2d(config.input_channels, c1, 3, 1, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1, 1)
        self.conv3 = nn.Conv2d(c2, c3, 3, 1, 1)
        self.conv4 = nn.Conv2d(c3, c3, 3, 1, 1)
        self.conv5 = nn.Conv2d(c3, c, 3, 1, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(c, eps=config.batch_norm_eps)
        self.conv6 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn6 = nn.BatchNorm2d(c, eps=config.batch_norm_eps)
        self.conv7 = nn.Conv2d(c, c, 2, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 32, 32, W/2]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 64, 16, W/4]
        x = F.relu(self.conv4(F.relu(self.conv3(x))))
        x = F.max_pool2d(x, (2, 1))  # [B, 128, 8, W/4]
        x = F.relu(self.bn6(self.conv6(F.relu(self.bn5(self.conv5(x))))))
        x = F.max_pool2d(x, (2, 1))  # [B, 256, 4, W/4]
        return F.relu(self.conv7(x))  # [B, 256, 3, W/4 - 1]


class BiLstm(nn.Module):
    """Bidirectional LSTM then a linear projection: [B, T, Din] -> [B, T, H]."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, bidirectional=True, batch_first=True)
        self.proj = nn.Linear(2 * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.lstm(x)  # [B, T, 2H]
        out: Tensor = self.proj(y)
        return out


class Crnn(nn.Module):
    """Grey crops [B, 1, 64, W] (normalised to [-1, 1]) -> logits [B, T, num_classes], T = W/4 - 1."""

    def __init__(self, config: CrnnConfig) -> None:
        super().__init__()
        self.config = config
        self.features = FeatureExtractor(config)
        self.rnn1 = BiLstm(config.feature_channels, config.hidden_size)
        self.rnn2 = BiLstm(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)  # [B, C, 3, T]
        seq = f.mean(dim=2).transpose(1, 2)  # [B, T, C]: average over the remaining height
        seq = self.rnn2(self.rnn1(seq))  # [B, T, H]
        out: Tensor = self.classifier(seq)  # [B, T, K]
        return out


# ---------------------------------------------------------------------------------------------
# Weights: EasyOCR names -> canonical names

_CONV = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 11, "bn5": 12, "conv6": 14,
         "bn6": 15, "conv7": 18}


def reference_name_map(config: CrnnConfig) -> dict[str, str]:
    """canonical name -> EasyOCR ``vgg_model.Model`` state-dict name (without ``module.``)."""
    m: dict[str, str] = {}
    with torch.device("meta"):
        names = list(Crnn(config).state_dict().keys())
    for n in names:
        parts = n.split(".")
        if parts[0] == "features":
            m[n] = f"FeatureExtraction.ConvNet.{_CONV[parts[1]]}.{parts[2]}"
        elif parts[0] in ("rnn1", "rnn2"):
            i = int(parts[0][-1]) - 1
            sub = "rnn" if parts[1] == "lstm" else "linear"
            m[n] = f"SequenceModeling.{i}.{sub}.{parts[2]}"
        elif parts[0] == "classifier":
            m[n] = f"Prediction.{parts[1]}"
        else:  # pragma: no cover - the module has no other parameters
            raise AssertionError(n)
    return m


def canonical_names(config: CrnnConfig) -> list[str]:
    with torch.device("meta"):
        return list(Crnn(config).state_dict().keys())


def load_crnn(
    weights_file: str | Path,
    config: CrnnConfig,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Crnn:
    """Build on meta, mmap the safetensors file and assign its tensors; returns an eval model."""
    with torch.device("meta"):
        model = Crnn(config)
    load_into(model, weights_file, what="recogniser", compute_dtype=compute_dtype, device=device)
    model.rnn1.lstm.flatten_parameters()
    model.rnn2.lstm.flatten_parameters()
    return model


# ---------------------------------------------------------------------------------------------
# Greedy CTC decoding


def ctc_greedy(
    logits: Tensor, charset: str, ignore: Sequence[int] = ()
) -> list[tuple[str, float]]:
    """Best path per crop: logits [B, T, K] -> [(text, confidence)].

    As EasyOCR: softmax; classes in ``ignore`` get probability 0 and the rest is renormalised;
    take the arg-max per step, merge repeats, drop blanks (index 0). The confidence is the
    product of the non-blank steps' max probabilities raised to 2 / sqrt(n) (0 if all blank).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [B, T, K]
    if len(ignore):
        probs[:, :, list(ignore)] = 0.0
        probs = probs / probs.sum(dim=-1, keepdim=True)
    best_p, best = probs.max(dim=-1)  # [B, T]
    out: list[tuple[str, float]] = []
    for p_row, i_row in zip(best_p.numpy(), best.numpy(), strict=True):
        keep = np.r_[True, i_row[1:] != i_row[:-1]] & (i_row != 0)
        text = "".join(charset[i - 1] for i in i_row[keep])
        steps = p_row[i_row != 0]
        conf = float(steps.prod() ** (2.0 / math.sqrt(len(steps)))) if len(steps) else 0.0
        out.append((text, conf))
    return out
