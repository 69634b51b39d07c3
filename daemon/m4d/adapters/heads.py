"""Task heads on the text encoder (M4 path 3): a linear layer, or a small MLP, over the
encoder's pooled, normalised sentence vector, one output per label, trained on the device's
CPU.

A head is two files in an adapter folder: ``head.safetensors`` (float32) and ``head.json``
(its labels, in output order, and the LoRA on the encoder it was trained with, if any:
``"lora": "<component>"``). A linear head holds ``weight`` [L, D] and ``bias`` [L]. An MLP
head adds one hidden layer, ``hidden.weight`` [H, D] and ``hidden.bias`` [H], and says so in
``head.json`` (``"hidden": H, "activation": "gelu"`` or ``"relu"``); its ``weight`` is then
[L, H]: logits = weight · act(hidden.weight · x + hidden.bias) + bias. ``Head.logits`` is the
one way a head is run (serving, evaluation and training alike).

Here the encoder stays frozen: training embeds the examples once and fits the head full-batch
by L-BFGS with weight decay, seeded (for a linear head that is softmax regression, a convex
problem), so a head over a few thousand examples trains in seconds. Training an encoder LoRA
with it is ``m4d.adapters.encoder_lora``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from m4image.fsutil import atomic_write_bytes
from torch import Tensor

from m4d.adapters.lora import AdapterError

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
# a hidden layer's activation, by its name in head.json (gelu: the exact, erf form)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu}


@dataclass
class Hidden:
    """An MLP head's hidden layer: act(x · weightᵀ + bias)."""

    weight: Tensor  # [H, D]
    bias: Tensor  # [H]
    activation: str = "gelu"  # a key of ACTIVATIONS


@dataclass
class Head:
    labels: list[str]
    weight: Tensor  # [L, D] float32; [L, H] over a hidden layer
    bias: Tensor  # [L]
    lora: str = ""  # the encoder LoRA it was trained with (a component name), "" for none
    hidden: Hidden | None = None  # None: a linear head

    @property
    def dim(self) -> int:
        """The dimension of the vectors it takes (its first layer's input)."""
        first = self.weight if self.hidden is None else self.hidden.weight
        return int(first.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        """Its weights, by their names in ``head.safetensors``."""
        out = {"weight": self.weight, "bias": self.bias}
        if self.hidden is not None:
            out |= {"hidden.weight": self.hidden.weight, "hidden.bias": self.hidden.bias}
        return out

    def with_tensors(self, tensors: Mapping[str, Tensor]) -> Head:
        """This head (labels, LoRA, layers) with other weights, named as ``tensors()`` names
        them (trainers pass parameters, then their detached values)."""
        hidden = None if self.hidden is None else Hidden(
            tensors["hidden.weight"], tensors["hidden.bias"], self.hidden.activation)
        return Head(self.labels, tensors["weight"], tensors["bias"], self.lora, hidden)

    def logits(self, vectors: Tensor) -> Tensor:
        """vectors [N, D] (the encoder's pooled output) -> [N, L]."""
        x = vectors.float()  # [N, D]
        if self.hidden is not None:
            x = ACTIVATIONS[self.hidden.activation](
                F.linear(x, self.hidden.weight, self.hidden.bias))  # [N, H]
        return F.linear(x, self.weight, self.bias)


def _check(head: Head) -> str:
    """What is wrong with the head's layers ("" when nothing): shapes that do not chain from
    its input to its labels, or an activation we do not run."""
    n, w, b = len(head.labels), head.weight, head.bias
    if head.hidden is not None:
        hw, hb, act = head.hidden.weight, head.hidden.bias, head.hidden.activation
        if act not in ACTIVATIONS:
            return f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}"
        if hw.dim() != 2 or hb.shape != (hw.shape[0],):
            return (f"needs hidden.weight [hidden, dim] and hidden.bias [hidden], not "
                    f"{list(hw.shape)} and {list(hb.shape)}")
        if w.dim() != 2 or w.shape[1] != hw.shape[0]:
            return (f"weight {list(w.shape)} must take the hidden layer's {hw.shape[0]} "
                    "outputs")
    if w.dim() != 2 or b.shape != (w.shape[0],) or w.shape[0] != n:
        return (f"needs weight [labels, {'hidden' if head.hidden is not None else 'dim'}] and "
                f"bias [labels] for its {n} labels, not {list(w.shape)} and {list(b.shape)}")
    return ""


def read_head(folder: Path) -> Head:
    """The head in `folder`, refused (AdapterError naming the file) unless its files agree."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / HEAD_CONFIG).read_text())
        labels, lora = list(config["labels"]), str(config.get("lora") or "")
        tensors = load_file(str(folder / HEAD_WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{folder} is not a task head ({HEAD_CONFIG} with its labels and "
                           f"{HEAD_WEIGHTS}): {exc}") from exc
    size, activation = config.get("hidden", 0), config.get("activation")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise AdapterError(f"{folder / HEAD_CONFIG}: \"hidden\" must be the hidden layer's "
                           f"width (an integer, 0 for none), not {size!r}")
    if size and activation not in ACTIVATIONS:
        raise AdapterError(f"{folder / HEAD_CONFIG}: \"activation\" {activation!r} is not one "
                           f"of {', '.join(ACTIVATIONS)}")
    if not size and activation is not None:
        raise AdapterError(f"{folder / HEAD_CONFIG}: an \"activation\" without a hidden layer "
                           "(\"hidden\": its width)")
    expected = {"weight", "bias"} | ({"hidden.weight", "hidden.bias"} if size else set())
    if set(tensors) != expected:
        raise AdapterError(f"{folder / HEAD_WEIGHTS}: holds {sorted(tensors)}; a "
                           f"{f'hidden-{size} MLP' if size else 'linear'} head in "
                           f"{HEAD_CONFIG} holds {sorted(expected)}")
    floats = {name: t.float() for name, t in tensors.items()}
    head = Head(labels, floats["weight"], floats["bias"], lora)
    if size:
        head.hidden = Hidden(floats["hidden.weight"], floats["hidden.bias"], str(activation))
    problem = _check(head)
    if not problem and size and floats["hidden.weight"].shape[0] != size:
        problem = f"its hidden layer is {floats['hidden.weight'].shape[0]} wide, not {size}"
    if problem:
        raise AdapterError(f"{folder / HEAD_WEIGHTS}: {problem}")
    return head


def write_head(folder: Path, head: Head) -> None:
    from safetensors.torch import save

    problem = _check(head)
    if problem:
        raise AdapterError(f"not writing the head to {folder}: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / HEAD_WEIGHTS, save(
        {name: t.detach().float().contiguous() for name, t in head.tensors().items()}))
    config: dict[str, Any] = {"labels": head.labels, **({"lora": head.lora} if head.lora else {})}
    if head.hidden is not None:
        config |= {"hidden": int(head.hidden.weight.shape[0]),
                   "activation": head.hidden.activation}
    atomic_write_bytes(folder / HEAD_CONFIG, (json.dumps(config, indent=2) + "\n").encode())


def new_head(labels: Sequence[str], dim: int, *, hidden: int = 0, activation: str = "gelu",
             seed: int = 0) -> Head:
    """An untrained head: linear at zero, or an MLP initialised as torch's nn.Linear
    (uniform within ±1/sqrt(fan_in)) from `seed` (its output layer at zero)."""
    n = len(labels)
    if hidden < 0:
        raise AdapterError(f"a head's hidden layer is 0 (none) or more wide, not {hidden}")
    if not hidden:
        return Head(list(labels), torch.zeros(n, dim), torch.zeros(n))
    if activation not in ACTIVATIONS:
        raise AdapterError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) / math.sqrt(dim)

    return Head(list(labels), torch.zeros(n, hidden), torch.zeros(n),
                hidden=Hidden(uniform(hidden, dim), uniform(hidden), activation))


def train_head(vectors: Tensor, labels: Sequence[str], *, weight_decay: float = 1e-3,
               steps: int = 200, seed: int = 0, hidden: int = 0,
               activation: str = "gelu") -> Head:
    """A head for `labels` on `vectors` [N, D], full batch by L-BFGS, weight decay (the
    squared sum of its weights, not biases, times `weight_decay`) on the cross-entropy:
    linear (softmax regression) or, with `hidden` > 0, an MLP with one hidden layer."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise AdapterError("a head needs examples of at least two labels")
    y = torch.tensor([names.index(label) for label in labels])
    start = new_head(names, vectors.shape[1], hidden=hidden, activation=activation, seed=seed)
    params = {name: t.clone().requires_grad_() for name, t in start.tensors().items()}
    trainable, decayed = start.with_tensors(params), [params["weight"]]
    if hidden:
        decayed.append(params["hidden.weight"])
    opt = torch.optim.LBFGS(list(params.values()), max_iter=steps, line_search_fn="strong_wolfe")
    x = vectors.float().clone()  # (inference-mode tensors cannot be saved for backward)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(trainable.logits(x), y) + weight_decay * sum(
            (w.pow(2).sum() for w in decayed), torch.zeros(()))
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return start.with_tensors({name: p.detach().clone() for name, p in params.items()})


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / max(len(expected), 1)
