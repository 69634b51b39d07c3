"""Task heads on the text encoder (M4 path 3): a linear layer over the encoder's pooled,
normalised sentence vector, one output per label, trained on the device's CPU.

A head is two files in an adapter folder: ``head.safetensors`` (``weight`` [L, D] and
``bias`` [L], float32) and ``head.json`` (its labels, in output order, and the LoRA on the
encoder it was trained with, if any: ``"lora": "<component>"``). Here the encoder stays
frozen: training embeds the examples once and fits the layer by softmax regression (L-BFGS,
weight decay, seeded), so a head over a few thousand examples trains in seconds. Training an
encoder LoRA with it is ``m4d.adapters.encoder_lora``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from m4image.fsutil import atomic_write_bytes
from torch import Tensor

from m4d.adapters.lora import AdapterError

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


@dataclass
class Head:
    labels: list[str]
    weight: Tensor  # [L, D] float32
    bias: Tensor  # [L]
    lora: str = ""  # the encoder LoRA it was trained with (a component name), "" for none

    def logits(self, vectors: Tensor) -> Tensor:
        """vectors [N, D] (the encoder's pooled output) -> [N, L]."""
        return F.linear(vectors.float(), self.weight, self.bias)


def read_head(folder: Path) -> Head:
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / HEAD_CONFIG).read_text())
        labels, lora = list(config["labels"]), str(config.get("lora") or "")
        tensors = load_file(str(folder / HEAD_WEIGHTS))
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterError(f"{folder} is not a task head ({HEAD_CONFIG} with its labels and "
                           f"{HEAD_WEIGHTS}): {exc}") from exc
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.dim() != 2 or bias.shape != (weight.shape[0],) \
            or weight.shape[0] != len(labels):
        raise AdapterError(f"{folder / HEAD_WEIGHTS}: needs weight [labels, dim] and bias "
                           f"[labels] for its {len(labels)} labels")
    return Head(labels, weight.float(), bias.float(), lora)


def write_head(folder: Path, head: Head) -> None:
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / HEAD_WEIGHTS, save(
        {"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}))
    config: dict[str, object] = {"labels": head.labels, **({"lora": head.lora} if head.lora else {})}
    atomic_write_bytes(folder / HEAD_CONFIG, (json.dumps(config, indent=2) + "\n").encode())


def train_head(vectors: Tensor, labels: Sequence[str], *, weight_decay: float = 1e-3,
               steps: int = 200, seed: int = 0) -> Head:
    """Softmax regression of `labels` on `vectors` [N, D] (full batch, L-BFGS)."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise AdapterError("a head needs examples of at least two labels")
    y = torch.tensor([names.index(label) for label in labels])
    torch.manual_seed(seed)
    w = torch.zeros(len(names), vectors.shape[1], requires_grad=True)
    b = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    x = vectors.float().clone()  # (inference-mode tensors cannot be saved for backward)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, w, b), y) + weight_decay * w.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return Head(names, w.detach().clone(), b.detach().clone())


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / max(len(expected), 1)
